"""SFT data: discovery, strict reading, truncation/label rules, collation and the feature cache."""

from __future__ import annotations

import os

import numpy as np
import pytest

import llm  # noqa: F401
from llm.data import (
    DataCollator,
    Example,
    build_prompt_ids,
    encode_example,
    find_split_files,
    load_split,
    pack_features,
    read_examples,
)
from llm.errors import DataError
from llm.templates import ChatTemplate
from llm.tokenizer import load_tokenizer

try:
    import helpers_tokenizer as h
except ImportError:  # tests/ imported as a package
    from tests import helpers_tokenizer as h

I = -100  # noqa: E741


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return load_tokenizer(h.make_tokenizer_dir(tmp_path_factory.mktemp("tok")))


def ex(src, tgt, context=None):
    src = src if isinstance(src, list) else [src]
    tgt = tgt if isinstance(tgt, list) else [tgt]
    return Example(src=src, tgt=tgt, context=context, path="mem.json", line=1)


# ------------------------------------------------------------------ discovery and reading
def test_find_split_files(tmp_path):
    assert find_split_files(str(tmp_path), "train") == []
    (tmp_path / "train").mkdir()
    for name in ("b.json", "a.json", "notes.txt"):
        (tmp_path / "train" / name).write_text("{}")
    assert find_split_files(str(tmp_path), "train") == [
        str(tmp_path / "train" / n) for n in ("a.json", "b.json")
    ]
    (tmp_path / "train.json").write_text("{}")
    assert find_split_files(str(tmp_path), "train") == [str(tmp_path / "train.json")]
    assert find_split_files(str(tmp_path), "dev") == []


def test_read_examples(tmp_path):
    path = h.write_jsonl(
        tmp_path / "train.json",
        [
            {"src": "a", "tgt": "b"},
            "",
            {"src": ["u1", "u2"], "tgt": ["b1", "b2"], "context": {"system": "S"}},
            {"src": ["only"], "tgt": "one"},
        ],
    )
    exs = read_examples(path)
    assert [(e.src, e.tgt, e.context, e.line) for e in exs] == [
        (["a"], ["b"], None, 1),
        (["u1", "u2"], ["b1", "b2"], {"system": "S"}, 3),
        (["only"], ["one"], None, 4),
    ]
    assert all(e.path == path for e in exs)


BAD_LINES = [
    ('{"src": "a", "tgt": ', 2, "invalid JSON"),
    ('{"tgt": "b"}', 2, "missing field 'src'"),
    ('{"src": "a"}', 2, "missing field 'tgt'"),
    ('{"src": 3, "tgt": "b"}', 2, "'src' must be a string or a list of strings, got int"),
    ('{"src": ["a", 1], "tgt": ["b", "c"]}', 2, "'src'[1] must be a string"),
    ('{"src": ["a", "b", "c"], "tgt": ["x", "y"]}', 2, "'src' has 3 turns but 'tgt' has 2"),
    ('{"src": [], "tgt": []}', 2, "'src' is an empty list"),
    ('{"src": "a", "tgt": "b", "context": "sys"}', 2, "'context' must be a JSON object"),
    ('["a", "b"]', 2, "expected a JSON object"),
]


@pytest.mark.parametrize("line,lineno,msg", BAD_LINES)
def test_malformed_lines_name_file_and_line(tmp_path, line, lineno, msg):
    path = h.write_jsonl(tmp_path / "train.json", [{"src": "ok", "tgt": "ok"}, line])
    with pytest.raises(DataError) as err:
        read_examples(path)
    assert str(err.value).startswith(f"{path}:{lineno}: {msg}")
    assert err.value.line == lineno


def test_empty_missing_and_binary_files(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match=f"^{empty}: no examples"):
        read_examples(str(empty))
    with pytest.raises(DataError, match="missing.json: file not found"):
        read_examples(str(tmp_path / "missing.json"))
    binary = tmp_path / "bin.json"
    binary.write_bytes(b'{"src": "a", "tgt": "b"}\n\xff\xfe\n')
    with pytest.raises(DataError, match=f"{binary}:2: not UTF-8"):
        read_examples(str(binary))
    assert read_examples(h.write_jsonl(tmp_path / "p.json", [{"src": "a"}]), require_tgt=False)[0].tgt == [""]


# ------------------------------------------------------------------ encoding without a template
def test_plain_encoding_and_shift(tok):
    src, tgt = tok.encode("hello world"), tok.encode("the fox", add_special_tokens=False)
    feat = encode_example(ex("hello world", "the fox"), tok, None, src_length=64, max_length=128)
    full = src + tgt + [tok.eos_token_id]
    assert feat["input_ids"] == full[:-1]
    assert feat["labels"] == ([I] * len(src) + tgt + [tok.eos_token_id])[1:]
    assert len(feat["input_ids"]) == len(feat["labels"])


def test_prompt_left_truncated_keeping_bos(tok):
    text = "The quick brown fox jumps over the lazy dog. " * 3
    body = tok.encode(text, add_special_tokens=False)
    feat = encode_example(ex(text, "x"), tok, None, src_length=10, max_length=32)
    src_part = [tok.bos_token_id] + body[-9:]
    assert feat["input_ids"][:10] == src_part
    assert feat["labels"][:9] == [I] * 9


def test_eos_only_when_target_not_cut(tok):
    src = tok.encode("q")
    tgt = tok.encode("the quick brown fox jumps", add_special_tokens=False)
    # enough room: EOS appended
    feat = encode_example(ex("q", "the quick brown fox jumps"), tok, None, 8, len(src) + len(tgt) + 1)
    assert feat["labels"][-1] == tok.eos_token_id
    # exactly the target length: not cut, but no room for EOS (paddlenlp's rule)
    feat = encode_example(ex("q", "the quick brown fox jumps"), tok, None, 8, len(src) + len(tgt))
    assert feat["labels"][-1] == tgt[-1] and tok.eos_token_id not in feat["labels"]
    # cut: no EOS, total length is max_length (minus the shift)
    feat = encode_example(ex("q", "the quick brown fox jumps"), tok, None, 8, len(src) + 3)
    assert feat["labels"] == ([I] * len(src) + tgt[:3])[1:]
    assert len(feat["input_ids"]) == len(src) + 3 - 1


def test_plain_multi_turn_uses_first_turn_and_generation(tok):
    multi = encode_example(ex(["first q", "second q"], ["first a", "second a"]), tok, None, 64, 128)
    assert multi == encode_example(ex("first q", "first a"), tok, None, 64, 128)
    gen = encode_example(ex("hello", "world"), tok, None, 64, 128, for_generation=True)
    assert gen == {"input_ids": tok.encode("hello"), "labels": tok.encode("world", add_special_tokens=False)}


# ------------------------------------------------------------------ encoding with a template
def _pieces(tok, tmpl, rounds, context=None):
    system, pairs = tmpl.encode_training(tok, rounds, context)
    return system, pairs


def test_template_label_masking(tok):
    tmpl = ChatTemplate.from_paddlenlp(h.PADDLENLP_TEMPLATE)
    rounds = [("hi", "hello"), ("how are you", "fine thanks")]
    system, pairs = _pieces(tok, tmpl, rounds, {"system": "S"})
    feat = encode_example(
        ex(["hi", "how are you"], ["hello", "fine thanks"], {"system": "S"}), tok, tmpl, 64, 256
    )
    ids = system + pairs[0][0] + pairs[0][1] + pairs[1][0] + pairs[1][1]
    labels = [I] * len(system) + [I] * len(pairs[0][0]) + pairs[0][1] + [I] * len(pairs[1][0]) + pairs[1][1]
    assert feat == {"input_ids": ids[:-1], "labels": labels[1:]}
    assert pairs[1][1][-1] == tok.eos_token_id  # "<|im_end|>" is not a stop id here, so EOS is appended
    assert tok.decode([t for t in labels if t != I]) == "hellofine thanks"


def test_oldest_rounds_dropped_whole(tok):
    tmpl = ChatTemplate.from_jinja(h.CHATML_TEMPLATE)
    rounds = [
        ("first question here", "first answer"),
        ("second one", "second answer"),
        ("third", "third answer"),
    ]
    system, pairs = _pieces(tok, tmpl, rounds)
    last_two = sum(len(u) + len(b) for u, b in pairs[1:])
    max_length = len(system) + last_two + len(pairs[0][0])  # round 1 does not fit whole
    e = ex([r[0] for r in rounds], [r[1] for r in rounds])
    feat = encode_example(e, tok, tmpl, src_length=max_length, max_length=max_length)
    kept = system + pairs[1][0] + pairs[1][1] + pairs[2][0] + pairs[2][1]
    assert feat["input_ids"] == kept[:-1]
    assert (
        feat["labels"]
        == ([I] * (len(system) + len(pairs[1][0])) + pairs[1][1] + [I] * len(pairs[2][0]) + pairs[2][1])[1:]
    )


def test_newest_round_alone_too_long(tok):
    tmpl = ChatTemplate.from_jinja(h.CHATML_TEMPLATE)
    user_text = "The quick brown fox jumps over the lazy dog. " * 4
    system, pairs = _pieces(tok, tmpl, [(user_text, "Paris is the capital of France.")])
    user, bot = pairs[0]
    src_length, max_length = len(system) + 12, len(system) + 20
    feat = encode_example(ex(user_text, "Paris is the capital of France."), tok, tmpl, src_length, max_length)
    expected = system + user[-12:] + bot[:8]  # user left-truncated (keeps the assistant marker), bot cut
    assert feat["input_ids"] == expected[:-1]
    assert feat["labels"] == ([I] * (len(system) + 12) + bot[:8])[1:]
    assert tok.eos_token_id not in feat["labels"]


def test_system_too_long_and_template_errors_name_the_line(tok):
    tmpl = ChatTemplate.from_paddlenlp(h.PADDLENLP_TEMPLATE)
    e = Example(["q"], ["a"], {"system": "word " * 50}, "data/train.json", 7)
    with pytest.raises(DataError, match=r"^data/train.json:7: the system prompt has \d+ tokens"):
        encode_example(e, tok, tmpl, 16, 32)
    raising = ChatTemplate.from_jinja("{{ raise_exception('bad roles') }}")
    with pytest.raises(DataError, match="^data/train.json:7: .*bad roles"):
        encode_example(e, tok, raising, 16, 32)


def test_generation_features_with_template(tok):
    tmpl = ChatTemplate.from_jinja(h.CHATML_TEMPLATE)
    rounds = [("one", "uno"), ("two", "dos"), ("three", "tres")]
    e = ex([r[0] for r in rounds], [r[1] for r in rounds])
    feat = encode_example(e, tok, tmpl, 256, 512, for_generation=True)
    assert feat["input_ids"] == tmpl.encode_prompt(tok, rounds[:-1], "three")
    assert feat["labels"] == tok.encode("tres", add_special_tokens=False)
    # src_length bounds the prompt: the oldest history round is dropped whole
    system, pairs, final = tmpl.encode_segments(tok, rounds[:-1], "three")
    limit = len(feat["input_ids"]) - 1
    short = build_prompt_ids(tok, tmpl, rounds[:-1], "three", limit)
    assert short == system + pairs[1][0] + pairs[1][1] + final
    tiny = build_prompt_ids(tok, tmpl, rounds[:-1], "three", len(system) + 3)
    assert tiny == system + final[-3:]


# ------------------------------------------------------------------ collator
def test_collator_unpacked(tok):
    feats = [{"input_ids": [5, 6, 7], "labels": [I, 6, 7]}, {"input_ids": [8], "labels": [9]}]
    b = DataCollator(tok, pad_to_multiple_of=4)(feats)
    assert b["input_ids"].tolist() == [[5, 6, 7, 3], [8, 3, 3, 3]]
    assert b["labels"].tolist() == [[I, 6, 7, I], [9, I, I, I]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert all(v.dtype == np.int64 for v in b.values())
    tok.padding_side = "left"
    try:
        b = DataCollator(tok, max_length=5, padding="max_length")(feats)
    finally:
        tok.padding_side = "right"
    assert b["input_ids"].tolist() == [[3, 3, 5, 6, 7], [3, 3, 3, 3, 8]]
    assert b["attention_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, 1]]
    gen = DataCollator(tok)([{"input_ids": [1, 2, 3], "labels": [4]}, {"input_ids": [1], "labels": [4, 5]}])
    assert gen["labels"].tolist() == [[4, I], [4, 5]] and gen["input_ids"].shape == (2, 3)


def test_collator_packed(tok):
    feats = [{"input_ids": [1, 2, 3], "labels": [2, 3, 4]}, {"input_ids": [5, 6], "labels": [6, 7]}]
    packs = pack_features(feats, 5) + pack_features([{"input_ids": [9], "labels": [I]}], 5)
    b = DataCollator(tok)(packs)
    assert b["attention_mask"].shape == (2, 1, 5, 5) and b["attention_mask"].dtype == bool
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 0, 0, 0, 0]]
    assert b["attention_mask"][0, 0].astype(int).tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ]
    # padding rows only see themselves (no fully masked softmax row); real tokens never see padding
    assert b["attention_mask"][1, 0].astype(int).tolist() == np.eye(5, dtype=int).tolist()
    # a packed feature without its mask gets the same mask rebuilt from position_ids
    lean = pack_features(feats, 5, with_mask=False) + pack_features(
        [{"input_ids": [9], "labels": [I]}], 5, False
    )
    b2 = DataCollator(tok)(lean)
    assert all(np.array_equal(b[k], b2[k]) for k in b)


# ------------------------------------------------------------------ load_split and the cache
def _dataset(tmp_path, n=5):
    rows = [{"src": f"question {i}", "tgt": f"answer {i}"} for i in range(n)]
    rows.append({"src": ["multi q1", "multi q2"], "tgt": ["a1", "a2"], "context": {"system": "S"}})
    h.write_jsonl(tmp_path / "data" / "train.json", rows)
    return str(tmp_path / "data")


def test_load_split_cache_hit(tok, tmp_path, monkeypatch):
    data = _dataset(tmp_path)
    tmpl = ChatTemplate.from_jinja(h.CHATML_TEMPLATE)
    calls = {"n": 0}
    real = tok.encode

    def counting(text, add_special_tokens=True):
        calls["n"] += 1
        return real(text, add_special_tokens)

    monkeypatch.setattr(tok, "encode", counting)
    kw = dict(src_length=64, max_length=128, zero_padding=False, cache_dir=str(tmp_path / "cache"))
    first = load_split(data, "train", tok, tmpl, **kw)
    first_calls = calls["n"]
    assert first_calls > 0 and len(first) == 6
    cached = [p for p in os.listdir(tmp_path / "cache") if p.endswith(".npz")]
    assert len(cached) == 1 and not [p for p in os.listdir(tmp_path / "cache") if p.startswith(".tmp")]
    calls["n"] = 0
    second = load_split(data, "train", tok, tmpl, **kw)
    assert calls["n"] == 0 and second == first
    with np.load(tmp_path / "cache" / cached[0], allow_pickle=False) as npz:  # plain arrays, no pickles
        assert npz["input_ids.data"].dtype == np.int32
    # any change of settings, template or data is a miss
    load_split(data, "train", tok, None, **kw)
    assert calls["n"] > 0
    calls["n"] = 0
    load_split(data, "train", tok, tmpl, **{**kw, "max_length": 100})
    assert calls["n"] == first_calls  # a miss re-tokenizes the whole split
    calls["n"] = 0
    with open(os.path.join(data, "train.json"), "a") as f:
        f.write('{"src": "new", "tgt": "row"}\n')
    assert len(load_split(data, "train", tok, tmpl, **kw)) == 7 and calls["n"] > first_calls


def test_load_split_packed_from_cache(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("LLM_CACHE_DIR", str(tmp_path / "envcache"))
    data = _dataset(tmp_path)
    packed = load_split(data, "train", tok, None, src_length=32, max_length=40, zero_padding=True)
    again = load_split(data, "train", tok, None, src_length=32, max_length=40, zero_padding=True)
    assert os.listdir(tmp_path / "envcache")
    assert len(packed) < 6 and all(len(p["input_ids"]) <= 40 for p in packed)
    for a, b in zip(packed, again):
        assert a["input_ids"] == b["input_ids"] and np.array_equal(a["attention_mask"], b["attention_mask"])
    gen = load_split(
        data, "train", tok, None, src_length=32, max_length=40, zero_padding=True, for_generation=True
    )
    assert len(gen) == 6 and "attention_mask" not in gen[0]  # generation features are never packed


def test_load_split_errors(tok, tmp_path):
    with pytest.raises(DataError, match="no 'dev' data"):
        load_split(
            str(tmp_path), "dev", tok, None, src_length=8, max_length=16, zero_padding=False, use_cache=False
        )
    h.write_jsonl(tmp_path / "bad" / "train.json", [{"src": "a", "tgt": "b"}, {"src": "a"}])
    with pytest.raises(DataError, match="train.json:2: missing field 'tgt'"):
        load_split(
            str(tmp_path / "bad"),
            "train",
            tok,
            None,
            src_length=8,
            max_length=16,
            zero_padding=False,
            use_cache=False,
        )
    # every target truncated away -> a clear error instead of NaN losses
    h.write_jsonl(tmp_path / "long" / "train.json", [{"src": "word " * 40, "tgt": "b"}])
    with pytest.raises(DataError, match="no usable examples"):
        load_split(
            str(tmp_path / "long"),
            "train",
            tok,
            None,
            src_length=30,
            max_length=30,
            zero_padding=False,
            use_cache=False,
        )
