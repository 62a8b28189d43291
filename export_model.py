"""Export a model (LoRA merged) to a static model for ``predictor.py --mode static`` (spec §6).

python export_model.py --model_name_or_path ./demo/model --lora_path ./checkpoints/demo_lora --output_path ./inference --dtype float32
"""

import llm  # noqa: F401  (first: zlib fix before paddle)
from llm.infer.export import main

if __name__ == "__main__":
    main()
