"""A PaddleNLP ``llm/``-style toolkit that runs on CPU as well as on GPUs.

The first import below is load-bearing: paddle 2.6.2's ``libpaddle.so`` exports a
private zlib 1.2.8, and if the system ``libz.so.1`` is first loaded *after* paddle,
its internal calls bind to paddle's copy and every later ``zlib``/``gzip`` use fails
with ``zlib.error: ... inconsistent stream state`` (or crashes). Loading ``zlib``
before paddle makes libz bind to itself. Every entry point imports ``llm`` first.
"""

import zlib  # noqa: F401, I001  (must stay the first import, see above)

from llm import runtime as _runtime

_runtime.apply()  # OMP/MKL defaults and malloc thresholds, before paddle loads (see llm/runtime.py)

__version__ = "0.1.0"
