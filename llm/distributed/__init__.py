"""Distributed training: the parallel layout (dp x pp x sharding x tp), its checks and the ``--dry_run`` report."""

from llm.distributed.layout import (
    ParallelLayout,
    check_layout,
    check_parallel,
    format_layout,
    plan_layout,
    read_model_config,
)

__all__ = [
    "ParallelLayout",
    "check_layout",
    "check_parallel",
    "format_layout",
    "plan_layout",
    "read_model_config",
]
