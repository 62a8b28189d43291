"""A PaddleNLP ``llm/``-style toolkit that runs on CPU as well as on GPUs.

The first import below is load-bearing: paddle 2.6.2's ``libpaddle.so`` exports a
private zlib 1.2.8, and if the system ``libz.so.1`` is first loaded *after* paddle,
its internal calls bind to paddle's copy and every later ``zlib``/``gzip`` use fails
with ``zlib.error: ... inconsistent stream state`` (or crashes). Loading ``zlib``
before paddle makes libz bind to itself. Every entry point imports ``llm`` first.
"""

import os as _os
import zlib  # noqa: F401  (must stay the first import, see above)

# paddle's CPU kernels run single-threaded unless OMP_NUM_THREADS is set, and MKL takes a
# slow code path on AMD processors unless told otherwise; both must be set before paddle loads.
_os.environ.setdefault(
    "OMP_NUM_THREADS", str(len(_os.sched_getaffinity(0)) if hasattr(_os, "sched_getaffinity") else 1)
)
_os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")

__version__ = "0.1.0"
