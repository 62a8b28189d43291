"""PaddleNLP-style entry point: ``python tools/preprocess/create_pretraining_data.py --model_name ... --input_path ...``.

Same flags as ``python -m llm.tools.preprocess`` (see docs/pretrain.md).
"""

import llm  # noqa: F401  (must come first: zlib fix before paddle)
from llm.tools.preprocess import main

if __name__ == "__main__":
    main()
