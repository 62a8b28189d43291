"""Tokenizer backends behind :class:`llm.tokenizer.Tokenizer`, incl. HF checkpoints without ``tokenizer.json``.

* :class:`HFBackend` wraps a ``tokenizers.Tokenizer`` (``tokenizer.json``); :class:`PaddleBackend` a paddlenlp
  tokenizer.
* ``vocab.json`` + ``merges.txt`` (GPT-2 style byte-level BPE): built as a ``tokenizers`` BPE with the
  ByteLevel pre-tokenizer and decoder, special/added tokens from ``tokenizer_config.json``; it then runs
  through the same adapter as ``tokenizer.json`` files.
* ``tokenizer.model`` (sentencepiece, HF ``LlamaTokenizer`` layout): :class:`SentencePieceBackend` uses the
  ``sentencepiece`` library with HF's *legacy-free* spacing by default (``"legacy": true`` in the config
  restores the old behaviour): one ``▁`` is prepended to the whole text (``add_prefix_space``, default: the
  model's ``add_dummy_prefix``), never to the text after a special token; special tokens in the text are
  matched literally. Decoding removes that one leading space again.

Only :func:`paddlenlp_class_fits` imports paddlenlp (lazily).
"""

from __future__ import annotations

import os
import re
import shutil
from typing import Any

from llm.errors import ModelError
from llm.fileio import try_read_json

SPIECE_UNDERLINE = "▁"


# ---------------------------------------------------------------------------------------- protobuf
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _fields(buf: bytes) -> list[tuple[int, int, bytes]]:
    """Top-level ``(field_number, wire_type, raw_bytes_including_key)`` of a serialized message."""
    out = []
    pos = 0
    while pos < len(buf):
        start = pos
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            pos += size
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated message")
        out.append((key >> 3, wire, buf[start:pos]))
    return out


def _payload(raw: bytes) -> bytes:
    """The body of a length-delimited field from its raw bytes."""
    _, pos = _varint(raw, 0)
    _, pos = _varint(raw, pos)
    return raw[pos:]


_NORMALIZER_SPEC = 3  # ModelProto.normalizer_spec
_ADD_DUMMY_PREFIX = 3  # NormalizerSpec.add_dummy_prefix (default true)
_REMOVE_EXTRA_WS = 4  # NormalizerSpec.remove_extra_whitespaces (default true)


def normalizer_flags(proto: bytes) -> dict[str, bool]:
    """``add_dummy_prefix`` / ``remove_extra_whitespaces`` of a serialized sentencepiece ``ModelProto``."""
    flags = {"add_dummy_prefix": True, "remove_extra_whitespaces": True}
    for number, wire, raw in _fields(proto):
        if number == _NORMALIZER_SPEC and wire == 2:
            for sub, sub_wire, sub_raw in _fields(_payload(raw)):
                if sub_wire == 0 and sub in (_ADD_DUMMY_PREFIX, _REMOVE_EXTRA_WS):
                    name = "add_dummy_prefix" if sub == _ADD_DUMMY_PREFIX else "remove_extra_whitespaces"
                    _, value_pos = _varint(sub_raw, 0)
                    flags[name] = bool(_varint(sub_raw, value_pos)[0])
    return flags


def without_dummy_prefix(proto: bytes) -> bytes:
    """The ``ModelProto`` with ``normalizer_spec.add_dummy_prefix = false`` (HF's legacy-free loading)."""
    out = bytearray()
    found = False
    for number, wire, raw in _fields(proto):
        if number == _NORMALIZER_SPEC and wire == 2:
            found = True
            subs = [r for n, w, r in _fields(_payload(raw)) if not (n == _ADD_DUMMY_PREFIX and w == 0)]
            body = b"".join(subs) + _encode_varint(_ADD_DUMMY_PREFIX << 3) + b"\x00"
            out += _encode_varint((_NORMALIZER_SPEC << 3) | 2) + _encode_varint(len(body)) + body
        else:
            out += raw
    if not found:
        body = _encode_varint(_ADD_DUMMY_PREFIX << 3) + b"\x00"
        out += _encode_varint((_NORMALIZER_SPEC << 3) | 2) + _encode_varint(len(body)) + body
    return bytes(out)


# ---------------------------------------------------------------------------------------- backends
class HFBackend:
    """``tokenizers.Tokenizer`` adapter."""

    kind = "hf"

    def __init__(self, tk: Any):
        self.tk = tk
        self.added_special = {i for i, t in tk.get_added_tokens_decoder().items() if t.special}

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tk.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tk.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self.tk.id_to_token(idx)

    def __len__(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)


class PaddleBackend:
    """``paddlenlp`` ``PretrainedTokenizer`` adapter."""

    kind = "paddlenlp"

    def __init__(self, tk: Any):
        self.tk = tk
        self.added_special = set(getattr(tk, "all_special_ids", []) or [])
        self._vocab: dict[str, int] | None = None

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        out = self.tk(
            text,
            add_special_tokens=add_special_tokens,
            return_attention_mask=False,
            return_token_type_ids=False,
        )
        return list(out["input_ids"])

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.tk.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        if self._vocab is None:
            self._vocab = dict(self.tk.get_vocab())
        return self._vocab.get(token)

    def id_to_token(self, idx: int) -> str | None:
        try:
            return self.tk.convert_ids_to_tokens(idx)
        except Exception:  # noqa: BLE001 - out-of-range ids
            return None

    def __len__(self) -> int:
        return len(self.tk)


# ---------------------------------------------------------------------------------------- helpers
def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def added_tokens(config: dict[str, Any]) -> list[tuple[int | None, str, bool]]:
    """``(id or None, content, special)`` for the config's added/special tokens (ids from ``added_tokens_decoder``)."""
    out: list[tuple[int | None, str, bool]] = []
    seen: set[str] = set()
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        for key, entry in sorted(decoder.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0):
            content = _token_content(entry)
            if content and str(key).isdigit():
                special = bool(entry.get("special", True)) if isinstance(entry, dict) else True
                out.append((int(key), content, special))
                seen.add(content)
    names = ["bos_token", "eos_token", "unk_token", "pad_token"]
    extra = config.get("additional_special_tokens") or []
    for value in [config.get(n) for n in names] + (list(extra) if isinstance(extra, list) else []):
        content = _token_content(value)
        if content and content not in seen:
            out.append((None, content, True))
            seen.add(content)
    return out


# ---------------------------------------------------------------------------------------- byte-level BPE
def build_bpe_from_vocab_merges(directory: str, config: dict[str, Any]) -> Any:
    """A ``tokenizers.Tokenizer`` for GPT-2 style ``vocab.json`` + ``merges.txt`` (ByteLevel pre-tokenizer/decoder)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab, merges = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    try:
        bpe = models.BPE.from_file(vocab, merges)
    except Exception as err:  # noqa: BLE001 - tokenizers raises plain Exception
        raise ModelError(f"{directory}: cannot read vocab.json/merges.txt ({err})") from None
    tk = Tokenizer(bpe)
    add_prefix_space = bool(config.get("add_prefix_space", False))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    for idx, content, special in added_tokens(config):
        token = AddedToken(content, special=special, normalized=not special)
        (tk.add_special_tokens if special else tk.add_tokens)([token])
        got = tk.token_to_id(content)
        if idx is not None and got != idx:
            raise ModelError(
                f"{directory}: added token {content!r} should have id {idx} (tokenizer_config.json) but "
                f"the vocabulary gives it id {got}"
            )
    return tk


# ---------------------------------------------------------------------------------------- sentencepiece
class SentencePieceBackend:
    """HF ``LlamaTokenizer``-compatible encoding with the ``sentencepiece`` library."""

    kind = "sentencepiece"

    def __init__(self, model_file: str, config: dict[str, Any]):
        import sentencepiece as spm

        self.model_file = model_file
        try:
            with open(model_file, "rb") as f:
                proto = f.read()
            flags = normalizer_flags(proto)
            self.legacy = bool(config.get("legacy", False))
            prefix = config.get("add_prefix_space")
            self.add_prefix_space = flags["add_dummy_prefix"] if prefix is None else bool(prefix)
            self.sp = spm.SentencePieceProcessor(
                model_proto=proto if self.legacy else without_dummy_prefix(proto)
            )
        except (OSError, ValueError, RuntimeError) as err:
            raise ModelError(f"{model_file}: not a valid sentencepiece model ({err})") from None
        self.unk_piece = self.sp.id_to_piece(self.sp.unk_id()) if self.sp.unk_id() >= 0 else "<unk>"
        self.unk_piece = _token_content(config.get("unk_token")) or self.unk_piece
        self._unk_len = len(self.sp.encode(self.unk_piece))
        self.specials: dict[str, int] = {}
        next_id = self.sp.get_piece_size()
        for idx, content, _special in added_tokens(config):
            if idx is None:
                idx = self._piece_id(content)
            if idx is None:
                idx, next_id = next_id, next_id + 1
            self.specials[content] = idx
        for i in range(self.sp.get_piece_size()):  # control symbols (<s>, </s>) are matched literally too
            if self.sp.is_control(i) and self.sp.id_to_piece(i) not in self.specials:
                self.specials[self.sp.id_to_piece(i)] = i
        self.special_by_id = {i: t for t, i in self.specials.items()}
        self.added_special = {
            i for i in self.special_by_id if i >= self.sp.get_piece_size() or self.sp.is_control(i)
        }
        self.added_special |= {self.specials[c] for i, c, s in added_tokens(config) if s}
        names = sorted(self.specials, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(re.escape(n) for n in names) + ")") if names else None
        self._underline_id = self._piece_id(SPIECE_UNDERLINE)

    def _piece_id(self, piece: str) -> int | None:
        idx = self.sp.piece_to_id(piece)
        if idx == self.sp.unk_id() and piece != self.sp.id_to_piece(idx):
            return None
        return idx

    def _chunk(self, text: str) -> list[int]:
        if self.legacy or not text.startswith((SPIECE_UNDERLINE, " ")):
            return list(self.sp.encode(text))
        ids = list(self.sp.encode(self.unk_piece + text))  # keeps leading spaces intact (HF's trick)
        return ids[self._unk_len :] if len(ids) >= self._unk_len else ids

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """Ids of ``text`` (BOS/EOS are added by :class:`llm.tokenizer.Tokenizer`)."""
        if not text:
            return []
        if not self.legacy:
            text = text.replace(SPIECE_UNDERLINE, " ")
            if self.add_prefix_space:
                text = SPIECE_UNDERLINE + text
        parts = self._split_re.split(text) if self._split_re else [text]
        ids: list[int] = []
        for i, part in enumerate(parts):
            if i % 2:
                ids.append(self.specials[part])
            elif part:
                if i == 0 and part == SPIECE_UNDERLINE and len(parts) > 1 and not self.legacy:
                    continue  # the prefix space before a leading special token is dropped
                ids += self._chunk(part)
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        """Text of ``ids``; the one space ``add_prefix_space`` put in front is removed again."""
        out: list[str] = []
        run: list[int] = []
        for idx in ids:
            if idx in self.special_by_id:
                out.append(self.sp.decode(run))
                run = []
                if not skip_special_tokens:
                    out.append(self.special_by_id[idx])
            elif 0 <= idx < self.sp.get_piece_size():
                run.append(idx)
        out.append(self.sp.decode(run))
        text = "".join(out)
        first = ids[0] if ids else None
        if (
            not self.legacy
            and self.add_prefix_space
            and first is not None
            and first not in self.special_by_id
            and 0 <= first < self.sp.get_piece_size()
            and self.sp.id_to_piece(first).startswith(SPIECE_UNDERLINE)
            and text.startswith(" ")
        ):
            text = text[1:]
        return text

    def token_to_id(self, token: str) -> int | None:
        if token in self.specials:
            return self.specials[token]
        return self._piece_id(token)

    def id_to_token(self, idx: int) -> str | None:
        if idx in self.special_by_id:
            return self.special_by_id[idx]
        return self.sp.id_to_piece(idx) if 0 <= idx < self.sp.get_piece_size() else None

    def __len__(self) -> int:
        return max([self.sp.get_piece_size(), *(i + 1 for i in self.special_by_id)])

    def save_files(self, save_dir: str) -> None:
        """Copy ``tokenizer.model`` into ``save_dir``."""
        target = os.path.join(save_dir, "tokenizer.model")
        if os.path.abspath(target) != os.path.abspath(self.model_file):
            shutil.copyfile(self.model_file, target)

    def config_updates(self) -> dict[str, Any]:
        """Settings to keep in the saved ``tokenizer_config.json`` so a reload behaves the same."""
        return {"legacy": self.legacy, "add_prefix_space": self.add_prefix_space}


def paddlenlp_class_fits(directory: str) -> bool:
    """True when ``tokenizer_config.json`` names a paddlenlp tokenizer class whose vocab files are all here."""
    name = try_read_json(os.path.join(directory, "tokenizer_config.json")).get("tokenizer_class")
    if not isinstance(name, str) or not name:
        return False
    import paddlenlp.transformers as pt

    files = getattr(getattr(pt, name, None), "resource_files_names", None)
    if not isinstance(files, dict) or not files:
        return False
    return all(os.path.isfile(os.path.join(directory, f)) for f in files.values())
