"""Run several invocations of the real entry scripts in ONE interpreter (each fresh one pays ~4 s for paddle).

A driver executes each script file with ``runpy`` (``sys.argv`` set, stdout/stderr captured) and reports the
exit code (``"crash"`` for an exception other than SystemExit) and the output of every case.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

DRIVER = r"""
import contextlib, io, json, runpy, sys, traceback
import llm
results = []
for script, argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    code = 0
    sys.argv = [script] + argv
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            code = "crash"
            err.write(traceback.format_exc())
    results.append({"code": code, "out": out.getvalue(), "err": err.getvalue()})
print("RESULTS=" + json.dumps(results))
"""


def run_scripts(
    cases: Sequence[tuple[str, list[str]]], env: dict[str, str], cwd: str | None = None, timeout: int = 300
) -> list[dict[str, Any]]:
    """``{"code", "out", "err"}`` of every ``(script, argv)`` in ``cases``, run one after another."""
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps([[script, list(argv)] for script, argv in cases])],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        cwd=cwd,
    )
    marker = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS=")]
    assert marker, proc.stderr[-3000:]
    return json.loads(marker[0][len("RESULTS=") :])
