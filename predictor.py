"""Generate with a fine-tuned or exported model (spec §5).

python predictor.py --model_name_or_path ./checkpoints/demo_sft --data_file ./demo/data/dev.json --decode_strategy greedy_search
python predictor.py --model_name_or_path ./demo/model --lora_path ./checkpoints/demo_lora --batch_size 4
python predictor.py --model_name_or_path ./inference --mode static
"""

import llm  # noqa: F401  (first: zlib fix before paddle)
from llm.infer.predictor import main

if __name__ == "__main__":
    main()
