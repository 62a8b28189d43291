"""Tokenizer loading behind one small interface.

paddlenlp 2.8.1 cannot read HF ``tokenizer.json`` files and ignores jinja chat templates, so the toolkit owns
tokenizer loading:

* **HF layout** (``tokenizer.json`` present): the ``tokenizers`` library does the tokenization; special tokens,
  ``add_bos_token``/``add_eos_token`` and the jinja ``chat_template`` come from ``tokenizer_config.json``
  (falling back to ``special_tokens_map.json``).
* **paddlenlp layout** (``tokenizer_config.json`` names a paddlenlp class whose vocab files are present, or
  no other format matches): wraps ``paddlenlp.transformers.AutoTokenizer.from_pretrained``.
* **HF files without tokenizer.json** (see :mod:`llm.tokenizer_backends`): ``tokenizer.model`` (sentencepiece,
  ``LlamaTokenizer`` rules: BOS added by default) and ``vocab.json`` + ``merges.txt`` (GPT-2 byte-level BPE).

Detection order: ``tokenizer.json``, fitting paddlenlp class, ``tokenizer.model``, ``vocab.json``+``merges.txt``,
any other paddlenlp files.

Extra stop ids come from ``generation_config.json`` (``eos_token_id`` may be an int or a list there).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from typing import TYPE_CHECKING, Any

import llm  # noqa: F401  (zlib fix before paddle)
from llm.errors import ModelError
from llm.fileio import read_json
from llm.tokenizer_backends import (
    HFBackend,
    PaddleBackend,
    SentencePieceBackend,
    build_bpe_from_vocab_merges,
    paddlenlp_class_fits,
)

if TYPE_CHECKING:
    from llm.templates import ChatTemplate

HF_TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.json"
CHAT_TEMPLATE_JINJA_FILE = "chat_template.jinja"
SP_MODEL_FILE = "tokenizer.model"
# Files that define a tokenizer (hashed for the dataset cache key); never model weights.
_META_FILES = (
    HF_TOKENIZER_FILE,
    TOKENIZER_CONFIG_FILE,
    SPECIAL_TOKENS_MAP_FILE,
    "added_tokens.json",
    CHAT_TEMPLATE_FILE,
    CHAT_TEMPLATE_JINJA_FILE,
    GENERATION_CONFIG_FILE,
)
_VOCAB_PATTERNS = ("*.model", "vocab.json", "merges.txt", "vocab.txt", "*.tiktoken", "vocab.model")


def _token_str(value: Any) -> str | None:
    """A special token from a config: a plain string or an AddedToken dict ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


class Tokenizer:
    """Uniform tokenizer used by training, prediction and serving.

    ``encode``/``decode`` work on plain lists of ids. ``eos_token_ids`` lists every id that ends generation.
    ``chat_template`` is a :class:`llm.templates.ChatTemplate` (or None).
    """

    def __init__(
        self,
        backend: HFBackend | PaddleBackend | SentencePieceBackend,
        name_or_path: str,
        *,
        bos_token: str | None,
        eos_token: str | None,
        pad_token: str | None,
        unk_token: str | None,
        extra_eos_ids: list[int] | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        config: dict[str, Any] | None = None,
        files: list[str] | None = None,
    ):
        self._backend = backend
        self.name_or_path = name_or_path
        self._config = dict(config or {})
        self._files = sorted(files or [])
        self._fingerprint: str | None = None
        self.padding_side = "right"
        self.chat_template: ChatTemplate | None = None
        self.source_chat_template: ChatTemplate | None = None  # the template in the source files
        # None = let tokenizer.json's post-processor decide (HF layout only).
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token

        extra = list(extra_eos_ids or [])
        self.bos_token, self.bos_token_id = bos_token, self._id_of(bos_token)
        self.unk_token, self.unk_token_id = unk_token, self._id_of(unk_token)
        eos_id = self._id_of(eos_token)
        if eos_id is None and extra:
            eos_id = extra[0]
            eos_token = backend.id_to_token(eos_id)
        if eos_id is None:
            raise ModelError(
                f"{name_or_path}: the tokenizer defines no usable eos token (expected 'eos_token' in "
                f"{TOKENIZER_CONFIG_FILE} / {SPECIAL_TOKENS_MAP_FILE}, or 'eos_token_id' in {GENERATION_CONFIG_FILE})"
            )
        self.eos_token, self.eos_token_id = eos_token, eos_id
        self.eos_token_ids = [eos_id] + [i for i in dict.fromkeys(extra) if i != eos_id]
        pad_id = self._id_of(pad_token)
        if pad_id is None:  # pad falls back to eos
            pad_token, pad_id = eos_token, eos_id
        self.pad_token, self.pad_token_id = pad_token, pad_id

    # ---------------------------------------------------------------- basics
    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    @property
    def backend_kind(self) -> str:
        """``"hf"`` (tokenizers library) or ``"paddlenlp"``."""
        return self._backend.kind

    @property
    def backend(self) -> Any:
        """The wrapped ``tokenizers.Tokenizer`` or paddlenlp tokenizer."""
        return self._backend.tk

    @property
    def special_ids(self) -> set[int]:
        """Ids removed by ``decode(skip_special_tokens=True)``."""
        ids = set(self._backend.added_special) | set(self.eos_token_ids)
        ids.update(i for i in (self.bos_token_id, self.pad_token_id, self.unk_token_id) if i is not None)
        return ids

    def __len__(self) -> int:
        return len(self._backend)

    @property
    def vocab_size(self) -> int:
        """Same as ``len(tokenizer)`` (vocabulary including added tokens)."""
        return len(self)

    def __repr__(self) -> str:
        return f"Tokenizer({self.name_or_path!r}, backend={self.backend_kind}, vocab={len(self)})"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` BOS/EOS are added as the config says."""
        if self._backend.kind != "paddlenlp" and add_special_tokens and self._manual_specials:
            ids = self._backend.encode(text, False)
            if self.add_bos_token and self.bos_token_id is not None:
                ids = [self.bos_token_id] + ids
            if self.add_eos_token:
                ids = ids + [self.eos_token_id]
            return ids
        return self._backend.encode(text, add_special_tokens)

    @property
    def _manual_specials(self) -> bool:
        return self.add_bos_token is not None or self.add_eos_token is not None

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (negative ids such as -100 are always dropped)."""
        ids = [int(i) for i in ids if int(i) >= 0]
        if skip_special_tokens:
            special = self.special_ids
            ids = [i for i in ids if i not in special]
        return self._backend.decode(ids, skip_special_tokens)

    def batch_decode(self, batch: Any, skip_special_tokens: bool = True) -> list[str]:
        """``decode`` for each row of ``batch``."""
        return [self.decode(row, skip_special_tokens) for row in batch]

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | list[int]:
        """Id of a token (or ids of a list of tokens); unknown tokens map to the unk id."""
        if isinstance(tokens, str):
            idx = self._backend.token_to_id(tokens)
            return self.unk_token_id if idx is None else idx  # type: ignore[return-value]
        return [self.convert_tokens_to_ids(t) for t in tokens]  # type: ignore[misc]

    def convert_ids_to_tokens(self, ids: int | list[int]) -> str | None | list[str | None]:
        """Token string of an id (or of each id in a list)."""
        if isinstance(ids, int):
            return self._backend.id_to_token(ids)
        return [self._backend.id_to_token(int(i)) for i in ids]

    def special_token_vars(self) -> dict[str, str]:
        """``bos_token``/``eos_token``/``pad_token``/``unk_token`` strings for chat-template rendering."""
        return {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            "pad_token": self.pad_token or "",
            "unk_token": self.unk_token or "",
        }

    def fingerprint(self) -> str:
        """sha256 over the tokenizer files' bytes and the resolved special-token settings."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(self._backend.kind.encode())
            for path in self._files:
                h.update(os.path.basename(path).encode() + b"\0")
                with open(path, "rb") as f:
                    h.update(hashlib.sha256(f.read()).digest())
            settings = [
                self.add_bos_token,
                self.add_eos_token,
                self.bos_token_id,
                self.eos_token_ids,
                self.pad_token_id,
            ]
            h.update(json.dumps(settings).encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    # ---------------------------------------------------------------- saving
    def save_pretrained(self, save_dir: str) -> None:
        """Write the tokenizer so ``load_tokenizer(save_dir)`` round-trips.

        The source directory's files are carried over whole (every special token, added token, vocab file and
        template stays as it was); only a chat template chosen for this run (``--chat_template``) is written
        over the source's. A tokenizer built in code, with no source files, is written from its state.
        """
        os.makedirs(save_dir, exist_ok=True)
        if not self._files:
            self._write_state(save_dir)
            return
        for src in self._files:
            dst = os.path.join(save_dir, os.path.basename(src))
            if not (os.path.exists(dst) and os.path.samefile(src, dst)):
                shutil.copy2(src, dst)
        if not _same_template(self.chat_template, self.source_chat_template):
            self._write_template(save_dir)

    def _write_template(self, save_dir: str) -> None:
        """Replace the saved chat template by ``self.chat_template`` (None removes it)."""
        tmpl = self.chat_template
        for name in (CHAT_TEMPLATE_FILE, CHAT_TEMPLATE_JINJA_FILE):
            path = os.path.join(save_dir, name)
            if os.path.isfile(path):
                os.remove(path)
        config_path = os.path.join(save_dir, TOKENIZER_CONFIG_FILE)
        config = read_json(config_path, missing_ok=True)
        config.pop("chat_template", None)
        if tmpl is not None and tmpl.kind == "jinja":
            config["chat_template"] = tmpl.source
        elif tmpl is not None:
            _write_json(os.path.join(save_dir, CHAT_TEMPLATE_FILE), tmpl.source)
        _write_json(config_path, config)

    def _write_state(self, save_dir: str) -> None:
        """Write a tokenizer that has no source files from its backend, specials and flags."""
        if self._backend.kind == "hf":
            self._backend.tk.save(os.path.join(save_dir, HF_TOKENIZER_FILE))
            config = dict(self._config)
        elif self._backend.kind == "sentencepiece":
            self._backend.save_files(save_dir)
            config = {**self._config, **self._backend.config_updates()}
        else:
            inner = self._backend.tk
            saved, inner.chat_template = getattr(inner, "chat_template", None), None
            try:
                inner.save_pretrained(save_dir)
            finally:
                inner.chat_template = saved
            config = read_json(os.path.join(save_dir, TOKENIZER_CONFIG_FILE), missing_ok=True)
        specials = {
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
        }
        specials = {k: v for k, v in specials.items() if v is not None}
        config.update(specials)
        for key in ("add_bos_token", "add_eos_token"):
            if getattr(self, key) is not None:
                config[key] = getattr(self, key)
        config.pop("chat_template", None)
        _write_json(os.path.join(save_dir, TOKENIZER_CONFIG_FILE), config)
        _write_json(os.path.join(save_dir, SPECIAL_TOKENS_MAP_FILE), specials)
        self._write_template(save_dir)
        gen_path = os.path.join(save_dir, GENERATION_CONFIG_FILE)
        if len(self.eos_token_ids) > 1 and not os.path.exists(gen_path):
            gen = {"eos_token_id": self.eos_token_ids, "pad_token_id": self.pad_token_id}
            if self.bos_token_id is not None:
                gen["bos_token_id"] = self.bos_token_id
            _write_json(gen_path, gen)


def _same_template(a: ChatTemplate | None, b: ChatTemplate | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.kind == b.kind and a.source == b.source


def _write_json(path: str, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2)


def _resolve_dir(path: str) -> str:
    if os.path.isdir(path):
        return path
    # a community name already in paddlenlp's local cache (same rule as paddlenlp.utils.env, without importing it)
    home = os.environ.get("PPNLP_HOME") or os.path.join(os.path.expanduser("~"), ".paddlenlp")
    cached = os.path.join(home, "models", path)
    if path and not os.path.isabs(path) and os.path.isdir(cached):
        return cached
    raise ModelError(
        f"{path}: tokenizer directory not found (expected a local directory with {HF_TOKENIZER_FILE}, "
        f"or a paddlenlp tokenizer: {TOKENIZER_CONFIG_FILE} plus sentencepiece/vocab files)"
    )


def _tokenizer_files(directory: str) -> list[str]:
    files = [os.path.join(directory, n) for n in _META_FILES if os.path.isfile(os.path.join(directory, n))]
    for pattern in _VOCAB_PATTERNS:
        files.extend(p for p in glob.glob(os.path.join(directory, pattern)) if os.path.isfile(p))
    return sorted(set(files))


def _load_hf(directory: str, name_or_path: str) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer

    path = os.path.join(directory, HF_TOKENIZER_FILE)
    try:
        tk = HFTokenizer.from_file(path)
    except Exception as err:  # noqa: BLE001 - tokenizers raises plain Exception
        raise ModelError(f"{path}: not a valid tokenizers JSON file ({err})") from None
    return _wrap(HFBackend(tk), directory, name_or_path, defaults=None)


def _wrap(
    backend: HFBackend | SentencePieceBackend,
    directory: str,
    name_or_path: str,
    defaults: tuple[bool, bool] | None,
    config: dict[str, Any] | None = None,
) -> Tokenizer:
    """A :class:`Tokenizer` over ``backend`` with specials/flags from the directory's config files.

    ``defaults`` are the ``(add_bos_token, add_eos_token)`` values used when the config does not set them;
    None lets a ``tokenizer.json`` post-processor decide.
    """
    if config is None:
        config = read_json(os.path.join(directory, TOKENIZER_CONFIG_FILE), missing_ok=True)
    stm = read_json(os.path.join(directory, SPECIAL_TOKENS_MAP_FILE), missing_ok=True)
    gen = read_json(os.path.join(directory, GENERATION_CONFIG_FILE), missing_ok=True)

    def special(name: str) -> str | None:
        return _token_str(config.get(name)) or _token_str(stm.get(name))

    def flag(name: str) -> bool | None:
        value = config.get(name)
        return value if isinstance(value, bool) else None

    add_bos, add_eos = flag("add_bos_token"), flag("add_eos_token")
    tok = Tokenizer(
        backend,
        name_or_path,
        bos_token=special("bos_token"),
        eos_token=special("eos_token"),
        pad_token=special("pad_token"),
        unk_token=special("unk_token"),
        extra_eos_ids=_as_id_list(gen.get("eos_token_id")),
        config=config,
        files=_tokenizer_files(directory),
    )
    if defaults is not None:
        tok.add_bos_token = defaults[0] if add_bos is None else add_bos
        tok.add_eos_token = defaults[1] if add_eos is None else add_eos
    elif add_bos is not None or add_eos is not None:
        # The unset flag keeps what the post-processor does, so a lone add_eos_token keeps its BOS.
        prefix, suffix = _post_processor_specials(backend)  # type: ignore[arg-type]
        tok.add_bos_token = add_bos if add_bos is not None else tok.bos_token_id in prefix
        tok.add_eos_token = add_eos if add_eos is not None else tok.eos_token_id in suffix
    return tok


def _merged_config(directory: str) -> dict[str, Any]:
    config = read_json(os.path.join(directory, TOKENIZER_CONFIG_FILE), missing_ok=True)
    for key, value in read_json(os.path.join(directory, SPECIAL_TOKENS_MAP_FILE), missing_ok=True).items():
        config.setdefault(key, value)
    return config


def _load_vocab_merges(directory: str, name_or_path: str) -> Tokenizer:
    """GPT-2 style ``vocab.json`` + ``merges.txt`` (no BOS/EOS added unless the config says so)."""
    config = _merged_config(directory)
    tk = build_bpe_from_vocab_merges(directory, config)
    return _wrap(HFBackend(tk), directory, name_or_path, defaults=(False, False), config=config)


def _load_sentencepiece(directory: str, name_or_path: str) -> Tokenizer:
    """HF ``LlamaTokenizer`` layout: ``tokenizer.model`` (BOS added by default, no EOS)."""
    config = _merged_config(directory)
    backend = SentencePieceBackend(os.path.join(directory, SP_MODEL_FILE), config)
    for name, idx in (("bos_token", backend.sp.bos_id()), ("eos_token", backend.sp.eos_id())):
        if name not in config and idx >= 0:  # a bare tokenizer.model: take the model's own markers
            config[name] = backend.sp.id_to_piece(idx)
    return _wrap(backend, directory, name_or_path, defaults=(True, False), config=config)


def _post_processor_specials(backend: HFBackend) -> tuple[list[int], list[int]]:
    """Ids the post-processor adds before and after a sequence."""
    probe = "a"
    body = backend.encode(probe, False)
    full = backend.encode(probe, True)
    for k in range(len(full) - len(body) + 1):
        if full[k : k + len(body)] == body:
            return full[:k], full[k + len(body) :]
    return [], []


def _load_paddlenlp(directory: str, name_or_path: str) -> Tokenizer:
    from paddlenlp.transformers import AutoTokenizer

    try:
        inner = AutoTokenizer.from_pretrained(directory)
    except Exception as err:  # noqa: BLE001 - paddlenlp raises many types here
        raise ModelError(
            f"{directory}: cannot load a paddlenlp tokenizer ({type(err).__name__}: {err}); expected "
            f"{TOKENIZER_CONFIG_FILE} with a tokenizer_class plus its vocab files, or {HF_TOKENIZER_FILE}"
        ) from None
    gen = read_json(os.path.join(directory, GENERATION_CONFIG_FILE), missing_ok=True)
    extra = _as_id_list(gen.get("eos_token_id"))
    eos_id = getattr(inner, "eos_token_id", None)
    if isinstance(eos_id, int) and eos_id not in extra:
        extra.insert(0, eos_id)
    return Tokenizer(
        PaddleBackend(inner),
        name_or_path,
        bos_token=getattr(inner, "bos_token", None),
        eos_token=getattr(inner, "eos_token", None),
        pad_token=getattr(inner, "pad_token", None),
        unk_token=getattr(inner, "unk_token", None),
        extra_eos_ids=extra,
        config=read_json(os.path.join(directory, TOKENIZER_CONFIG_FILE), missing_ok=True),
        files=_tokenizer_files(directory),
    )


def load_tokenizer(path: str, chat_template: str | None = None) -> Tokenizer:
    """Load a tokenizer directory (HF ``tokenizer.json`` or paddlenlp layout) with its chat template.

    ``chat_template`` follows :func:`llm.templates.resolve_chat_template` (None keeps the directory's own
    template, ``"none"`` removes it, a directory/file loads that template). Raises ``ModelError`` for a
    missing directory or unrecognised files.
    """
    from llm.templates import load_template_from_dir, resolve_chat_template

    directory = _resolve_dir(path)
    has = lambda name: os.path.isfile(os.path.join(directory, name))  # noqa: E731
    if has(HF_TOKENIZER_FILE):
        tok = _load_hf(directory, path)
    elif paddlenlp_class_fits(directory):
        tok = _load_paddlenlp(directory, path)
    elif has(SP_MODEL_FILE):
        tok = _load_sentencepiece(directory, path)
    elif has("vocab.json") and has("merges.txt"):
        tok = _load_vocab_merges(directory, path)
    elif has(TOKENIZER_CONFIG_FILE) or any(glob.glob(os.path.join(directory, p)) for p in _VOCAB_PATTERNS):
        tok = _load_paddlenlp(directory, path)
    else:
        raise ModelError(
            f"{directory}: no tokenizer files found (expected {HF_TOKENIZER_FILE}, or a paddlenlp tokenizer: "
            f"{TOKENIZER_CONFIG_FILE} plus sentencepiece/vocab files)"
        )
    tok.chat_template = tok.source_chat_template = load_template_from_dir(directory)
    resolve_chat_template(tok, path, chat_template)
    return tok
