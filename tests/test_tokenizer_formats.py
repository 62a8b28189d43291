"""Real-checkpoint tokenizer layouts: tokenizer.json pre-tokenizers, vocab.json+merges.txt, tokenizer.model.

Every tokenizer is trained here (nothing is downloaded) and the toolkit's ids are compared with the
reference libraries on the same files: ``tokenizers`` for the BPE layouts, and ``sentencepiece`` itself plus
a ``tokenizers`` SentencePiece-compatible conversion (Metaspace "first" + byte fallback, the way HF converts
Llama tokenizers) for ``tokenizer.model``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

import llm  # noqa: F401  (zlib fix first)
from llm.tokenizer import load_tokenizer

CORPUS = [
    "hello world, this is a tiny corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog 12345 times.",
    "你好，世界。今天天气很好。我们来训练一个小模型。",
    "emoji party 😀🎉 and more text 2024-06-01",
    "user assistant system question answer   spaced   out",
] * 8

TEXTS = [
    "hello world",
    " leading space and  double  spaces",
    "digits 1234567 and 2024-06-01",
    "你好，世界！今天😀🎉",
    "unseen chars: 🦙 ÆØ ∑",
    "tabs\tand\nnewlines\n\n",
    "",
]


def _write_json(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


# ------------------------------------------------------------------------------------ byte-level BPE
def _train_bytelevel(digits: bool = False):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if digits:
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        tk.pre_tokenizer = byte_level
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(CORPUS, trainer=trainer)
    return tk


def test_tokenizer_json_with_digit_splitting(tmp_path: Path) -> None:
    ref = _train_bytelevel(digits=True)
    ref.save(str(tmp_path / "tokenizer.json"))
    _write_json(tmp_path / "tokenizer_config.json", {"eos_token": "<|endoftext|>", "add_bos_token": False})
    tok = load_tokenizer(str(tmp_path))
    assert tok.encode("year 2024") == ref.encode("year 2024").ids
    assert [tok.convert_ids_to_tokens(i) for i in tok.encode("2024")] == ["2", "0", "2", "4"]
    for text in TEXTS + ["<|im_start|>user\n12<|im_end|>"]:
        ids = ref.encode(text, add_special_tokens=False).ids
        assert tok.encode(text, add_special_tokens=False) == ids
        assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)


def test_vocab_json_merges_txt_matches_tokenizers(tmp_path: Path) -> None:
    from tokenizers import AddedToken
    from tokenizers.implementations import ByteLevelBPETokenizer

    _train_bytelevel().model.save(str(tmp_path))  # vocab.json + merges.txt only
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "added_tokens_decoder": {
            "1": {"content": "<|im_start|>", "special": True},
            "2": {"content": "<|im_end|>", "special": True},
        },
        "chat_template": "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}",
    }
    _write_json(tmp_path / "tokenizer_config.json", config)
    _write_json(tmp_path / "generation_config.json", {"eos_token_id": [0, 2]})

    ref = ByteLevelBPETokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    ref.add_special_tokens(
        [AddedToken(t, special=True) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")]
    )
    tok = load_tokenizer(str(tmp_path))
    assert tok.backend_kind == "hf" and tok.add_bos_token is False and tok.add_eos_token is False
    assert tok.eos_token_ids == [0, 2] and tok.chat_template is not None
    for text in TEXTS + ["<|im_start|>user hi<|im_end|><|endoftext|>"]:
        ids = ref.encode(text).ids
        assert tok.encode(text) == ids, text
        assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True)

    saved = tmp_path / "saved"
    tok.save_pretrained(str(saved))
    again = load_tokenizer(str(saved))
    assert all(again.encode(t) == tok.encode(t) for t in TEXTS)
    assert again.eos_token_ids == [0, 2]


# ------------------------------------------------------------------------------------ sentencepiece
@pytest.fixture(scope="module")
def sp_model(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(  # Llama-like: BPE, byte fallback, identity normalization, digits split
        sentence_iterator=iter(CORPUS),
        model_writer=buf,
        vocab_size=420,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return buf.getvalue()


def _sp_dir(path: Path, proto: bytes, **config: object) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_bytes(proto)
    base = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    _write_json(path / "tokenizer_config.json", {**base, **config})
    return path


def _converted(proto: bytes):
    """The ``tokenizers`` equivalent of a Llama sentencepiece BPE (HF's legacy-free conversion)."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    sp = spm.SentencePieceProcessor(model_proto=proto)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = []
    for piece, idx in vocab.items():
        if sp.is_control(idx) or sp.is_unknown(idx) or sp.is_byte(idx):
            continue
        pairs = [
            (piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in vocab and piece[k:] in vocab
        ]
        merges += [
            (left, right, sp.get_score(idx))
            for left, right in sorted(pairs, key=lambda p: (vocab[p[0]], vocab[p[1]]))
        ]
    merges.sort(key=lambda m: m[2], reverse=True)
    bpe = models.BPE(
        vocab, [(m[0], m[1]) for m in merges], unk_token="<unk>", fuse_unk=True, byte_fallback=True
    )
    tk = Tokenizer(bpe)
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tk.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    return tk


def test_sentencepiece_matches_sentencepiece(tmp_path: Path, sp_model: bytes) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
    d = _sp_dir(tmp_path / "sp", sp_model, chat_template=template)
    _write_json(d / "generation_config.json", {"eos_token_id": [2, 7]})
    tok = load_tokenizer(str(d))
    assert tok.backend_kind == "sentencepiece" and (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok.eos_token_ids == [2, 7] and tok.chat_template is not None and len(tok) == sp.get_piece_size()
    for text in TEXTS:
        ids = sp.encode(text)
        assert tok.encode(text, add_special_tokens=False) == ids, text
        assert tok.encode(text) == [1] + ids  # LlamaTokenizer default: BOS, no EOS
        assert tok.decode(ids) == sp.decode(ids)
    assert tok.decode([1, *sp.encode("hi there"), 2]) == "hi there"

    eos = load_tokenizer(str(_sp_dir(tmp_path / "eos", sp_model, add_bos_token=False, add_eos_token=True)))
    assert eos.encode("hello") == sp.encode("hello") + [2]


def test_sentencepiece_matches_tokenizers_conversion(tmp_path: Path, sp_model: bytes) -> None:
    ref = _converted(sp_model)
    tok = load_tokenizer(str(_sp_dir(tmp_path / "sp", sp_model, add_bos_token=False)))
    with_specials = ["<s>hello</s> world", "hi<s>  there", "</s>", "a <unk> b", "你好</s>😀"]
    # Known difference: for text *starting* with whitespace, Metaspace does not prepend another "▁" while
    # sentencepiece (and HF's slow LlamaTokenizer) do; the toolkit follows sentencepiece (tested above).
    for text in [t for t in TEXTS if not t[:1].isspace()] + with_specials:
        ids = ref.encode(text, add_special_tokens=False).ids
        assert tok.encode(text) == ids, text
        assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False), text
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=True), text


def test_sentencepiece_legacy_and_save_round_trip(tmp_path: Path, sp_model: bytes) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_proto=sp_model)
    legacy = load_tokenizer(str(_sp_dir(tmp_path / "legacy", sp_model, legacy=True)))
    # legacy: every chunk after a special token gets its own dummy prefix
    assert legacy.encode("hi</s>there", add_special_tokens=False) == sp.encode("hi") + [2] + sp.encode(
        "there"
    )
    modern = load_tokenizer(str(_sp_dir(tmp_path / "modern", sp_model)))
    assert modern.encode("hi</s>there", add_special_tokens=False) != legacy.encode("hi</s>there", False)
    modern.save_pretrained(str(tmp_path / "saved"))
    again = load_tokenizer(str(tmp_path / "saved"))
    assert again.backend_kind == "sentencepiece"
    for text in TEXTS + ["hi</s>there"]:
        assert again.encode(text) == modern.encode(text)
