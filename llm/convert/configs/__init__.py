"""Config translation between Hugging Face ``config.json`` files and paddlenlp 2.8.1 configs, per family.

``*_to_paddle(hf: dict) -> dict`` returns keyword arguments for the paddlenlp config class;
``*_to_hf(cfg) -> dict`` returns an HF ``config.json``. Both raise :class:`ModelError` (via :func:`refuse`)
for settings paddlenlp 2.8.1 cannot reproduce exactly, naming the setting and the reason.

Split by family group: :mod:`.rotary` (llama, qwen2, mixtral, qwen, chatglm2/3) and :mod:`.classic`
(bloom, gpt-2, opt), with the shared helpers in :mod:`.common`.
"""

from llm.convert.configs.classic import (
    bloom_to_hf,
    bloom_to_paddle,
    gpt2_to_hf,
    gpt2_to_paddle,
    opt_to_hf,
    opt_to_paddle,
)
from llm.convert.configs.common import refuse
from llm.convert.configs.rotary import (
    chatglm2_to_hf,
    chatglm2_to_paddle,
    is_chatglm_v1,
    llama_to_hf,
    llama_to_paddle,
    mixtral_to_hf,
    mixtral_to_paddle,
    qwen2_to_paddle,
    qwen_to_hf,
    qwen_to_paddle,
)

__all__ = [
    "bloom_to_hf",
    "bloom_to_paddle",
    "chatglm2_to_hf",
    "chatglm2_to_paddle",
    "gpt2_to_hf",
    "gpt2_to_paddle",
    "is_chatglm_v1",
    "llama_to_hf",
    "llama_to_paddle",
    "mixtral_to_hf",
    "mixtral_to_paddle",
    "opt_to_hf",
    "opt_to_paddle",
    "qwen2_to_paddle",
    "qwen_to_hf",
    "qwen_to_paddle",
    "refuse",
]
