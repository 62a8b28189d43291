"""Tokenizer loading (HF tokenizer.json and paddlenlp layouts), special tokens, save/load round trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import llm  # noqa: F401
from llm.errors import ModelError
from llm.tokenizer import Tokenizer, load_tokenizer

try:
    import helpers_tokenizer as h
except ImportError:  # tests/ imported as a package
    from tests import helpers_tokenizer as h

TEXTS = [
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "你好，世界。",
    "  spaces\tand\nnewlines ",
    "",
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return h.make_tokenizer_dir(tmp_path_factory.mktemp("tok"), generation_config={"eos_token_id": [2, 5]})


@pytest.fixture(scope="module")
def tok(tok_dir):
    return load_tokenizer(tok_dir)


def test_load_hf_special_tokens(tok):
    assert isinstance(tok, Tokenizer) and tok.backend_kind == "hf"
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (1, 2, 3, 0)
    assert tok.eos_token_ids == [2, 5]
    assert tok.padding_side == "right"
    assert len(tok) == 400
    assert tok.convert_tokens_to_ids("<|im_end|>") == 5
    assert tok.convert_tokens_to_ids(["<s>", "</s>", "no-such-token"]) == [1, 2, 0]
    assert tok.chat_template is not None and tok.chat_template.kind == "jinja"


def test_encode_decode_round_trip(tok):
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_token_id  # add_bos_token=True in tokenizer_config.json
        assert tok.encode(text, add_special_tokens=False) == ids[1:]
        assert tok.decode(ids) == text
        assert tok.decode(ids, skip_special_tokens=False) == "<s>" + text
    assert tok.decode([1, *tok.encode("hi", False), 5, 2, 3, -100]) == "hi"
    assert tok.batch_decode([tok.encode("a b"), tok.encode("c")]) == ["a b", "c"]


def test_matches_tokenizers_library(tok_dir, tok):
    from tokenizers import Tokenizer as HFTokenizer

    ref = HFTokenizer.from_file(os.path.join(tok_dir, "tokenizer.json"))
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>\n"]:
        assert tok.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False).ids
    # special tokens written in text are recognised as single ids
    assert tok.encode("<|im_start|>x<|im_end|>", False)[0] == 4


def test_post_processor_decides_without_config_flags(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    d = h.make_tokenizer_dir(tmp_path / "pp", add_bos_token=None, bos_post_processor=True)
    tok = load_tokenizer(d)
    ref = HFTokenizer.from_file(os.path.join(d, "tokenizer.json"))
    assert tok.add_bos_token is None
    assert tok.encode("hello") == ref.encode("hello").ids and tok.encode("hello")[0] == 1
    # an explicit add_bos_token=False overrides the post-processor
    d2 = h.make_tokenizer_dir(tmp_path / "nobos", add_bos_token=False, bos_post_processor=True)
    assert load_tokenizer(d2).encode("hello") == ref.encode("hello", add_special_tokens=False).ids
    # add_eos_token alone keeps the post-processor's BOS
    d3 = h.make_tokenizer_dir(
        tmp_path / "eos", add_bos_token=None, add_eos_token=True, bos_post_processor=True
    )
    ids = load_tokenizer(d3).encode("hello")
    assert ids[0] == 1 and ids[-1] == 2


def test_special_token_variants(tmp_path):
    d = h.make_tokenizer_dir(tmp_path / "dicts", special_tokens_as_dicts=True, pad_token=None)
    tok = load_tokenizer(d)
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    assert tok.pad_token_id == tok.eos_token_id == 2  # pad falls back to eos
    assert tok.eos_token_ids == [2]
    # special_tokens_map.json is used when tokenizer_config.json lacks the tokens
    d2 = h.make_tokenizer_dir(tmp_path / "stm")
    cfg = json.load(open(os.path.join(d2, "tokenizer_config.json")))
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        cfg.pop(key)
    json.dump(cfg, open(os.path.join(d2, "tokenizer_config.json"), "w"))
    json.dump(
        {"eos_token": "<|im_end|>", "bos_token": "<s>"},
        open(os.path.join(d2, "special_tokens_map.json"), "w"),
    )
    json.dump({"eos_token_id": 2}, open(os.path.join(d2, "generation_config.json"), "w"))
    tok2 = load_tokenizer(d2)
    assert tok2.eos_token_id == 5 and tok2.eos_token_ids == [5, 2] and tok2.pad_token_id == 5


def test_save_pretrained_round_trip(tok, tmp_path):
    tok.save_pretrained(str(tmp_path / "saved"))
    again = load_tokenizer(str(tmp_path / "saved"))
    for text in TEXTS:
        assert again.encode(text) == tok.encode(text)
    assert again.eos_token_ids == tok.eos_token_ids
    assert (again.bos_token_id, again.pad_token_id, len(again)) == (
        tok.bos_token_id,
        tok.pad_token_id,
        len(tok),
    )
    assert again.chat_template.source == tok.chat_template.source
    # a paddlenlp template is written as chat_template.json, and "none" removes it on the next save
    from llm.templates import ChatTemplate

    again.chat_template = ChatTemplate.from_paddlenlp(h.PADDLENLP_TEMPLATE)
    again.save_pretrained(str(tmp_path / "saved2"))
    assert os.path.isfile(tmp_path / "saved2" / "chat_template.json")
    third = load_tokenizer(str(tmp_path / "saved2"))
    assert third.chat_template.kind == "paddlenlp" and third.chat_template.source == h.PADDLENLP_TEMPLATE
    third.chat_template = None
    third.save_pretrained(str(tmp_path / "saved2"))
    assert load_tokenizer(str(tmp_path / "saved2")).chat_template is None


def test_load_with_chat_template_override(tok_dir, tmp_path):
    assert load_tokenizer(tok_dir, chat_template="none").chat_template is None
    path = tmp_path / "t.json"
    path.write_text(json.dumps(h.PADDLENLP_TEMPLATE))
    assert load_tokenizer(tok_dir, chat_template=str(path)).chat_template.kind == "paddlenlp"


def test_missing_and_bad_dirs(tmp_path):
    with pytest.raises(ModelError, match="no-such-dir.*tokenizer directory not found"):
        load_tokenizer(str(tmp_path / "no-such-dir"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="empty: no tokenizer files found.*tokenizer.json"):
        load_tokenizer(str(tmp_path / "empty"))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelError, match="tokenizer.json: not a valid tokenizers JSON"):
        load_tokenizer(str(tmp_path / "bad"))


def test_missing_dir_exits_with_one_line(tmp_path):
    code = (
        "import sys; import llm; from llm.errors import exit_on_user_error; from llm.tokenizer import load_tokenizer\n"
        "exit_on_user_error(lambda: load_tokenizer(sys.argv[1]))()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "nope")], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ")


def test_fingerprint_tracks_files(tok_dir, tmp_path):
    a = load_tokenizer(tok_dir).fingerprint()
    assert a == load_tokenizer(tok_dir).fingerprint()
    d = h.make_tokenizer_dir(tmp_path / "other", add_bos_token=False)
    assert load_tokenizer(d).fingerprint() != a


def test_paddlenlp_layout(tmp_path, tok):
    d = h.make_paddlenlp_tokenizer_dir(tmp_path / "pd", paddlenlp_template=h.PADDLENLP_TEMPLATE)
    assert not os.path.exists(os.path.join(d, "tokenizer.json"))
    ptok = load_tokenizer(d)
    assert ptok.backend_kind == "paddlenlp"
    assert (ptok.bos_token_id, ptok.eos_token_id, ptok.pad_token_id) == (1, 2, 3)
    for text in TEXTS:
        assert ptok.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
        assert ptok.decode(ptok.encode(text)) == text
    assert ptok.chat_template.kind == "paddlenlp"
    ptok.save_pretrained(str(tmp_path / "pd2"))
    again = load_tokenizer(str(tmp_path / "pd2"))
    assert again.backend_kind == "paddlenlp" and again.chat_template.source == h.PADDLENLP_TEMPLATE
    assert again.encode("hello world") == ptok.encode("hello world")
