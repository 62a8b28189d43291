"""SFT data pipeline: discovery, reading, encoding, packing, collation and the feature cache."""

from llm.data.cache import default_cache_dir, load_split
from llm.data.collator import DataCollator
from llm.data.encode import IGNORE_INDEX, build_prompt_ids, encode_example, encode_source, has_supervision
from llm.data.packing import block_causal_mask, pack_features, segment_lengths
from llm.data.reader import Example, find_split_files, parse_example, read_examples

__all__ = [
    "IGNORE_INDEX",
    "DataCollator",
    "Example",
    "block_causal_mask",
    "build_prompt_ids",
    "default_cache_dir",
    "encode_example",
    "encode_source",
    "find_split_files",
    "has_supervision",
    "load_split",
    "pack_features",
    "parse_example",
    "read_examples",
    "segment_lengths",
]
