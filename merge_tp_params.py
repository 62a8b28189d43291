"""Merge tensor/pipeline-parallel shards into one model, or split one (PaddleNLP ``merge_tp_params.py``).

python merge_tp_params.py --model_name_or_path ./checkpoints/llama_sft_ckpts/checkpoint-100
python merge_tp_params.py --model_name_or_path ./model --action split --tensor_parallel_degree 2 --output_path ./tp2
"""

import llm  # noqa: F401  (first: zlib fix before paddle)
from llm.merge.cli import merge_tp_main

if __name__ == "__main__":
    merge_tp_main()
