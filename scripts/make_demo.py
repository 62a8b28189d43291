"""Build the embedded demo: a tiny LLaMA model, its HF-style tokenizer and a toy dataset.

Deterministic: running it twice writes byte-identical data and tokenizer files (the
model weights come from a fixed seed). Usage::

    python scripts/make_demo.py [--out demo]

The task ("number words") is one a ~1M-parameter model learns in a few CPU minutes:
``spell: 42`` -> ``forty two`` and ``digits: forty two`` -> ``42``, single- and multi-turn.

``--corpus FILE`` writes the pretraining corpus instead, and ``--pretrain WORKDIR`` pretrains ``<out>/model`` on
it the way a user would (corpus -> ``python -m llm.tools.preprocess`` -> ``run_pretrain.py
<out>/pretrain_argument.json``) and saves the result as ``<out>/model``: the shipped demo model is that result.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import subprocess
import sys

import llm  # noqa: F401  (zlib fix before paddle)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
ONES = "zero one two three four five six seven eight nine".split()
TEENS = "ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}<|assistant|>"
    "{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: documents in the pretraining corpus (``--corpus``)
CORPUS_DOCS = 20000
MODEL_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


def spell(n: int) -> str:
    """English words of ``0 <= n < 1000``: 342 -> "three hundred forty two"."""
    words = []
    if n >= 100:
        words += [ONES[n // 100], "hundred"]
        n %= 100
        if n == 0:
            return " ".join(words)
    if n < 10:
        words.append(ONES[n])
    elif n < 20:
        words.append(TEENS[n - 10])
    else:
        words.append(TENS[n // 10])
        if n % 10:
            words.append(ONES[n % 10])
    return " ".join(words)


def make_turn(rng: random.Random) -> tuple[str, str]:
    """One (question, answer) pair in either direction."""
    n = rng.randrange(1000)
    if rng.random() < 0.5:
        return f"spell: {n}", spell(n)
    return f"digits: {spell(n)}", str(n)


def make_examples(rng: random.Random, n: int, multi_turn_ratio: float = 0.25) -> list[dict]:
    """``n`` examples; a share of them are 2-3 turn conversations (``src``/``tgt`` lists)."""
    examples = []
    for _ in range(n):
        turns = rng.choice([2, 3]) if rng.random() < multi_turn_ratio else 1
        src, tgt = [], []
        for _ in range(turns):
            question, reply = make_turn(rng)
            src.append(question)
            tgt.append(reply)
        if turns == 1:
            examples.append({"src": src[0], "tgt": tgt[0]})
        else:
            examples.append({"src": src, "tgt": tgt})
    return examples


def make_fact(rng: random.Random) -> str:
    """One sentence relating numbers and their words (the pretraining corpus's unit)."""
    n = rng.randrange(1000)
    kind = rng.randrange(4)
    if kind == 0:
        return f"{n} is {spell(n)}."
    if kind == 1:
        return f"{spell(n)} is {n}."
    start = rng.randrange(998)
    run = range(start, min(start + rng.randrange(3, 7), 1000))
    if kind == 2:
        return ", ".join(spell(k) for k in run) + "."
    return ", ".join(str(k) for k in run) + "."


def make_chat(rng: random.Random) -> str:
    """A short chat transcript in the tokenizer's chat format: a number one way, the reply the other way."""
    turns = []
    for _ in range(rng.randrange(1, 4)):
        n = rng.randrange(1000)
        question, reply = (str(n), spell(n)) if rng.random() < 0.5 else (spell(n), str(n))
        turns.append(f"<|user|>{question}<|assistant|>{reply}</s>")
    return "<s>" + "".join(turns)


def make_corpus(rng: random.Random, n_docs: int) -> list[dict]:
    """``n_docs`` pretraining documents ``{"text": ...}``: prose of 4-12 number facts, or (one in two) a chat
    transcript converting bare numbers (the demo task without its ``spell:`` / ``digits:`` prompts)."""
    return [
        {
            "text": make_chat(rng)
            if rng.random() < 0.5
            else " ".join(make_fact(rng) for _ in range(rng.randrange(4, 13)))
        }
        for _ in range(n_docs)
    ]


def build_tokenizer(corpus: list[str]):
    """A BPE tokenizer trained on ``corpus`` with the ``tokenizers`` library.

    LLaMA-style metaspace words plus individual-digit splitting, so numbers are spelled
    digit by digit as in real LLaMA/Qwen tokenizers.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never"),
            pre_tokenizers.Digits(individual_digits=True),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    alphabet = ["▁"] + list(string.ascii_letters) + list(string.digits) + list(":.,!?'-")
    trainer = trainers.BpeTrainer(
        vocab_size=160, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return tok


def write_jsonl(path: str, rows: list[dict]) -> None:
    """Write ``rows`` as JSON lines."""
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_tokenizer(out_dir: str, corpus: list[str]) -> int:
    """Write tokenizer.json + tokenizer_config.json; return the vocabulary size."""
    tok = build_tokenizer(corpus)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": MODEL_CONFIG["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return tok.get_vocab_size()


def write_model(out_dir: str, vocab_size: int, seed: int = 0) -> None:
    """Random-initialise the tiny LLaMA (fixed seed) and save it as safetensors."""
    import paddle
    from paddlenlp.transformers import LlamaConfig, LlamaForCausalLM

    paddle.seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=3, **MODEL_CONFIG
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    write_generation_config(out_dir)


def write_generation_config(out_dir: str) -> None:
    """The demo's generation defaults (``save_pretrained`` would write paddlenlp's own)."""
    with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "max_length": 32}, f, indent=2)
        f.write("\n")


def _run(cmd: list[str]) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def pretrain(out: str, workdir: str, n_docs: int) -> None:
    """Pretrain ``<out>/model`` from its config on the generated corpus, the way a user would, and save the
    result back into ``<out>/model`` (safetensors): corpus -> ``llm.tools.preprocess`` -> ``run_pretrain.py``."""
    model_dir = os.path.join(out, "model")
    corpus = os.path.join(workdir, "corpus.jsonl")
    os.makedirs(workdir, exist_ok=True)
    write_jsonl(corpus, make_corpus(random.Random(4321), n_docs))
    tokens, trained = os.path.join(workdir, "tokens"), os.path.join(workdir, "pretrain")
    os.makedirs(tokens, exist_ok=True)
    python = sys.executable
    _run([python, "-m", "llm.tools.preprocess", "--model_name", model_dir, "--input_path", corpus,
          "--output_prefix", os.path.join(tokens, "demo"), "--append_eos", "--workers", "2"])  # fmt: skip
    _run([python, os.path.join(ROOT, "run_pretrain.py"), os.path.join(out, "pretrain_argument.json"), "--model_name_or_path",
          model_dir, "--input_dir", tokens, "--output_dir", trained, "--overwrite_output_dir", "true"])  # fmt: skip
    from paddlenlp.transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(trained)
    for name in ("model.safetensors", "model_state.pdparams", "config.json"):
        if os.path.exists(os.path.join(model_dir, name)):
            os.remove(os.path.join(model_dir, name))
    model.save_pretrained(model_dir, safe_serialization=True)
    write_generation_config(model_dir)
    print(f"wrote the pretrained {model_dir} (from {trained})")


def main() -> None:
    """Write ``<out>/model`` and ``<out>/data``; or the pretraining corpus; or pretrain ``<out>/model``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="demo")
    parser.add_argument("--train_size", type=int, default=4000)
    parser.add_argument("--eval_size", type=int, default=200)
    parser.add_argument(
        "--corpus", metavar="FILE", help="only write the pretraining corpus (JSON lines) to FILE"
    )
    parser.add_argument("--corpus_docs", type=int, default=CORPUS_DOCS, help="documents in the corpus")
    parser.add_argument(
        "--pretrain", metavar="WORKDIR", help="pretrain <out>/model on the corpus (work files in WORKDIR)"
    )
    args = parser.parse_args()
    if args.corpus:
        os.makedirs(os.path.dirname(os.path.abspath(args.corpus)), exist_ok=True)
        write_jsonl(args.corpus, make_corpus(random.Random(4321), args.corpus_docs))
        print(f"wrote {args.corpus_docs} documents to {args.corpus}")
        return
    if args.pretrain:
        pretrain(args.out, args.pretrain, args.corpus_docs)
        return

    model_dir, data_dir = os.path.join(args.out, "model"), os.path.join(args.out, "data")
    os.makedirs(model_dir, exist_ok=True)
    os.makedirs(data_dir, exist_ok=True)
    rng = random.Random(1234)
    train = make_examples(rng, args.train_size)
    write_jsonl(os.path.join(data_dir, "train.json"), train)
    write_jsonl(os.path.join(data_dir, "dev.json"), make_examples(rng, args.eval_size))
    write_jsonl(os.path.join(data_dir, "test.json"), make_examples(rng, args.eval_size))
    corpus = [
        t
        for ex in train
        for key in ("src", "tgt")
        for t in ([ex[key]] if isinstance(ex[key], str) else ex[key])
    ]
    vocab_size = write_tokenizer(model_dir, corpus)
    write_model(model_dir, vocab_size)
    print(f"wrote {model_dir} (vocab {vocab_size}) and {data_dir}")


if __name__ == "__main__":
    main()
