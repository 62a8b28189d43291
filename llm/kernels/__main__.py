"""``python -m llm.kernels [--strict]``: build the custom ops (or load them from the cache) and report the dispatch.

The install command runs it once, so that no later process pays the ~20 s build. Where the kernels cannot be built
(no C++ compiler, a failed build) it prints one notice line and exits 0: the toolkit then runs paddle ops, which is
not an installation failure. ``--strict`` (CI) exits 1 instead."""

from __future__ import annotations

import argparse
import sys
import time

import llm  # noqa: F401  (zlib fix before paddle)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llm.kernels", description=__doc__)
    parser.add_argument("--strict", action="store_true", help="exit 1 when the kernels are unavailable")
    args = parser.parse_args(argv)
    from llm import kernels
    from llm.kernels import build

    if not kernels.enabled_by_env():
        print("llm kernels disabled by LLM_KERNELS=0 (paddle ops are used)")
        return 0
    start = time.perf_counter()
    try:
        directory = build.build_dir()
        built = build.build(directory, force=True)
    except Exception as exc:  # noqa: BLE001  (reported as the one-line reason)
        reason = " ".join(str(exc).split())
    else:
        reason = None if kernels.available() else kernels.unavailable_reason()
    if reason is not None:
        print(
            f"{'error' if args.strict else 'notice'}: llm kernels unavailable ({reason}); paddle ops are used"
        )
        return 1 if args.strict else 0
    state = kernels.configure()
    how = f"built in {built:.1f} s" if built else f"cached, loaded in {time.perf_counter() - start:.2f} s"
    print(f"llm kernels: {how}")
    print(f"  build dir: {directory}")
    print(f"  isa: {state['isa']} (cpu: avx512={state['cpu_avx512']}, avx2={state['cpu_avx2']})")
    print(f"  threads: {state['threads']}, worker spin: {state['spin_us']} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
