"""Serve a model over HTTP (spec §9): PaddleNLP's /api/chat with the Gradio UI, and an OpenAI-compatible API.

python flask_server.py --model_name_or_path ./checkpoints/demo_sft --flask_port 8010 --port 8011
python flask_server.py --model_name_or_path ./demo/model --no_ui --api_key secret --max_batch_size 8
python -m paddle.distributed.launch --nproc_per_node 1 flask_server.py --model_name_or_path ./demo/model
"""

import llm  # noqa: F401  (first: zlib fix before paddle)
from llm.serve.server import main

if __name__ == "__main__":
    main()
