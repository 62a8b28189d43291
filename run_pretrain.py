"""Pretrain a causal LM (LLaMA, Qwen, GPT) on mmap token files from a JSON argument file and/or CLI flags.

python run_pretrain.py ./demo/pretrain_argument.json [--key value ...]
python -u -m paddle.distributed.launch --gpus "0,1,2,3,4,5,6,7" run_pretrain.py ./qwen/pretrain_argument_stage2.json
"""

import llm  # noqa: F401  (first: zlib fix before paddle)
from llm.pretrain.run import main

if __name__ == "__main__":
    main()
