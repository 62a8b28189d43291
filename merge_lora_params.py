"""Merge LoRA weights into the base model and verify the result (PaddleNLP 2.8 ``merge_lora_params.py``).

python merge_lora_params.py --lora_path ./checkpoints/llama_lora --merge_lora_model_path ./merged
    [--model_name_or_path BASE] [--device cpu] [--safe_serialization true]
"""

import llm  # noqa: F401  (first: zlib fix before paddle)
from llm.merge.cli import merge_lora_main

if __name__ == "__main__":
    merge_lora_main()
