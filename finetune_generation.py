"""Fine-tune a causal LM (SFT, LoRA, Prefix tuning) from a JSON argument file and/or CLI flags.

python finetune_generation.py ./llama/lora_argument.json [--key value ...]
python -m paddle.distributed.launch --nproc_per_node 2 finetune_generation.py ./demo/lora_argument.json
"""

import llm  # noqa: F401  (first: zlib fix before paddle)
from llm.train.finetune import main

if __name__ == "__main__":
    main()
