"""Test helpers: a tiny byte-level BPE tokenizer trained in code and saved as an HF-style directory.

Nothing is downloaded. Training takes ~0.1 s; the trained ``tokenizer.json`` text is memoised per process
so many tests can write their own directories cheaply.
"""

from __future__ import annotations

import json
import os
from typing import Any

import llm  # noqa: F401  (zlib fix before anything else)

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD, IM_START, IM_END]

# ChatML-style HF template with a leading BOS; the bot turn ends with <|im_end|>\n (no EOS).
CHATML_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama-2-style template: system folded into the first user turn, bot turn ends with EOS.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

# paddlenlp chat_template.json style (Qwen example from the spec, with a context-driven system prompt).
PADDLENLP_TEMPLATE = {
    "system": "<|im_start|>system\n{{ system if system else 'You are a helpful assistant.' }}<|im_end|>",
    "conversation": [
        "\n<|im_start|>user\n{{user}}<|im_end|>\n<|im_start|>assistant\n",
        "{{bot}}<|im_end|>",
    ],
    "query": "\n<|im_start|>user\n{{query}}<|im_end|>\n<|im_start|>assistant\n",
}

_CORPUS = [
    "hello world, this is a tiny corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog.",
    "PaddleNLP fine-tuning: src and tgt fields, chat templates, zero padding.",
    "user assistant system question answer response instruction",
    "你好，世界。今天天气很好。我们来训练一个小模型。",
    "类型#裙*颜色#蓝色*风格#清新 这条裙子非常漂亮",
    "What is the capital of France? Paris is the capital of France.",
    "1 2 3 4 5 6 7 8 9 10 100 1000",
] * 4

_MEMO: dict[tuple, str] = {}


def _train_json(vocab_size: int, bos_post_processor: bool) -> str:
    key = (vocab_size, bos_post_processor)
    if key not in _MEMO:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

        tok = Tokenizer(models.BPE(unk_token=None))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(_CORPUS, trainer=trainer)
        if bos_post_processor:
            bos_id = tok.token_to_id(BOS)
            tok.post_processor = processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
            )
        else:
            tok.post_processor = processors.ByteLevel(trim_offsets=False)
        _MEMO[key] = tok.to_str()
    return _MEMO[key]


def make_tokenizer_dir(
    path: str | os.PathLike,
    *,
    chat_template: str | None = CHATML_TEMPLATE,
    add_bos_token: bool | None = True,
    add_eos_token: bool | None = None,
    pad_token: str | None = PAD,
    bos_post_processor: bool = False,
    vocab_size: int = 400,
    generation_config: dict[str, Any] | None = None,
    paddlenlp_template: dict[str, Any] | None = None,
    special_tokens_as_dicts: bool = False,
) -> str:
    """Train (memoised) a tiny byte-level BPE and write an HF-style tokenizer directory at ``path``.

    Writes ``tokenizer.json`` and ``tokenizer_config.json`` (bos/eos/pad/unk, ``add_bos_token``, jinja
    ``chat_template``), optionally ``generation_config.json`` and a paddlenlp ``chat_template.json``.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(_train_json(vocab_size, bos_post_processor))

    def tok_entry(content: str) -> Any:
        if special_tokens_as_dicts:
            return {
                "content": content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "special": True,
            }
        return content

    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok_entry(BOS),
        "eos_token": tok_entry(EOS),
        "unk_token": tok_entry(UNK),
        "model_max_length": 2048,
    }
    if pad_token is not None:
        config["pad_token"] = tok_entry(pad_token)
    if add_bos_token is not None:
        config["add_bos_token"] = add_bos_token
    if add_eos_token is not None:
        config["add_eos_token"] = add_eos_token
    if chat_template is not None:
        config["chat_template"] = chat_template
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
    if generation_config is not None:
        with open(os.path.join(path, "generation_config.json"), "w", encoding="utf-8") as f:
            json.dump(generation_config, f)
    if paddlenlp_template is not None:
        with open(os.path.join(path, "chat_template.json"), "w", encoding="utf-8") as f:
            json.dump(paddlenlp_template, f, ensure_ascii=False)
    return path


def write_jsonl(path: str | os.PathLike, rows: list[Any]) -> str:
    """Write ``rows`` as JSON lines (strings are written verbatim, to allow malformed lines)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return path


def make_paddlenlp_tokenizer_dir(
    path: str | os.PathLike, paddlenlp_template: dict[str, Any] | None = None
) -> str:
    """The same BPE as a paddlenlp ``GPTTokenizer`` directory (vocab.json + merges.txt, no tokenizer.json)."""
    import tempfile

    from paddlenlp.transformers import GPTTokenizer
    from tokenizers import Tokenizer

    path = os.fspath(path)
    with tempfile.TemporaryDirectory() as tmp:
        Tokenizer.from_str(_train_json(400, False)).model.save(tmp)
        tok = GPTTokenizer(
            vocab_file=os.path.join(tmp, "vocab.json"),
            merges_file=os.path.join(tmp, "merges.txt"),
            bos_token=BOS,
            eos_token=EOS,
            pad_token=PAD,
            unk_token=UNK,
        )
        tok.save_pretrained(path)
    if paddlenlp_template is not None:
        with open(os.path.join(path, "chat_template.json"), "w", encoding="utf-8") as f:
            json.dump(paddlenlp_template, f, ensure_ascii=False)
    return path
