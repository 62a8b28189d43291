"""Find and read the weight files of a model directory (Hugging Face or paddlenlp layout), shard by shard."""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from typing import Any

from llm.convert.tensors import (
    SafetensorsFile,
    Tensor,
    check_pickle_file,
    open_weight_file,
    read_safetensors_header,
)
from llm.errors import ModelError
from llm.fileio import read_json
from llm.outputs import require_complete

HF_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)
PADDLE_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("model_state.pdparams.index.json", "model_state.pdparams"),
)
PADDLE_PREFIXES = ("llama.", "qwen.", "chatglm_v2.", "chatglm.", "bloom.", "gpt.", "opt.", "mixtral.", "glm.")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "qwen.tiktoken",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
)


class Checkpoint:
    """The weight files of one directory, read lazily.

    safetensors and mmap-able torch files cost no RAM until a tensor is used; pickle files that must be
    loaded whole (``.pdparams``, legacy ``.bin``) are kept at most ``max_eager`` at a time.
    """

    def __init__(
        self, directory: str, files: list[str], key_file: dict[str, str], paddle_layout: bool
    ) -> None:
        self.directory = directory
        self.files = files
        self.key_file = key_file
        self.paddle_layout = paddle_layout
        self._readers: OrderedDict[str, Any] = OrderedDict()
        self.max_eager = 1

    @property
    def sharded(self) -> bool:
        return len(self.files) > 1

    def reader(self, name: str) -> Any:
        if name in self._readers:
            self._readers.move_to_end(name)
            return self._readers[name]
        eager = [n for n, r in self._readers.items() if not isinstance(r, SafetensorsFile)]
        while len(eager) >= self.max_eager and not name.endswith(".safetensors"):
            self._readers.pop(eager.pop(0)).close()
        reader = open_weight_file(os.path.join(self.directory, name), paddle_layout=self.paddle_layout)
        self._readers[name] = reader
        return reader

    def keys(self, name: str | None = None) -> list[str]:
        """All tensor names (or those of one file), in file order."""
        if name is not None:
            return [k for k, f in self.key_file.items() if f == name]
        return list(self.key_file)

    def info(self, key: str) -> tuple[tuple[int, ...], str]:
        return self.reader(self.key_file[key]).info(key)

    def get(self, key: str) -> Tensor:
        return self.reader(self.key_file[key]).get(key)

    def release(self, name: str) -> None:
        reader = self._readers.pop(name, None)
        if reader is not None:
            reader.close()

    def close(self) -> None:
        for name in list(self._readers):
            self.release(name)


def _from_index(directory: str, index_name: str, paddle_layout: bool) -> Checkpoint:
    index = read_json(os.path.join(directory, index_name))
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelError(f"{os.path.join(directory, index_name)}: no 'weight_map' in the index")
    files = list(dict.fromkeys(weight_map.values()))
    missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
    if missing:
        raise ModelError(
            f"{directory}: {len(missing)} of {len(files)} shards listed in {index_name} are missing "
            f"(e.g. '{missing[0]}')"
        )
    key_file = {k: weight_map[k] for k in sorted(weight_map, key=lambda k: (files.index(weight_map[k]), k))}
    return Checkpoint(directory, files, key_file, paddle_layout)


def _single(directory: str, name: str, paddle_layout: bool) -> Checkpoint:
    ckpt = Checkpoint(directory, [name], {}, paddle_layout)
    ckpt.key_file = {k: name for k in ckpt.reader(name).keys()}
    return ckpt


def open_checkpoint(
    directory: str, paddle_layout: bool, layouts: tuple[tuple[str, str], ...] | None = None
) -> Checkpoint:
    """The weights of ``directory`` (index JSON first, then a single file); :class:`ModelError` if none.

    ``layouts`` (``(index name, single file name)`` pairs, preferred first) defaults to the model layouts of
    paddlenlp or Hugging Face; adapters pass their own file names.
    """
    require_complete(directory)
    layouts = layouts or (PADDLE_LAYOUTS if paddle_layout else HF_LAYOUTS)
    for index_name, single in layouts:
        if os.path.isfile(os.path.join(directory, index_name)):
            return _from_index(directory, index_name, paddle_layout)
        if os.path.isfile(os.path.join(directory, single)):
            return _single(directory, single, paddle_layout)
    stray = sorted(f for f in _listdir(directory) if f.endswith((".safetensors", ".bin")))
    hint = f" (found {stray[0]} but no index JSON naming the shards)" if stray else ""
    wanted = " or ".join(f"{s} / {i}" for i, s in layouts)
    raise ModelError(f"{directory}: no model weights found; expected {wanted}{hint}")


def _listdir(directory: str) -> list[str]:
    try:
        return os.listdir(directory)
    except OSError:
        return []


def weight_files(directory: str) -> list[str]:
    """Names of weight and index files in ``directory`` (both layouts)."""
    names = {n for pair in HF_LAYOUTS + PADDLE_LAYOUTS for n in pair}
    found = [f for f in _listdir(directory) if f in names]
    for index in (
        "model.safetensors.index.json",
        "pytorch_model.bin.index.json",
        "model_state.pdparams.index.json",
    ):
        path = os.path.join(directory, index)
        if os.path.isfile(path):
            found += list(dict.fromkeys(read_json(path).get("weight_map", {}).values()))
    return sorted(set(found))


def check_weight_files(directory: str) -> None:
    """Refuse (one :class:`ModelError` line naming the file) a truncated or corrupt weight file of
    ``directory`` without loading it: safetensors headers against the file size, pickle files' ends."""
    for name in weight_files(directory):
        path = os.path.join(directory, name)
        if name.endswith(".json") or not os.path.isfile(path):
            continue
        if name.endswith(".safetensors"):
            read_safetensors_header(path)
        else:
            check_pickle_file(path)


def detect_layout(directory: str) -> str | None:
    """``"hf"``, ``"paddle"`` or ``None`` (no weights) for a model directory.

    paddle ``.pdparams`` wins; torch ``.bin`` is HF; safetensors are told apart by their ``format``
    metadata (``pt`` = HF, ``np`` = paddle) and, without metadata, by the tensor-name prefixes.
    """
    has = lambda name: os.path.isfile(os.path.join(directory, name))  # noqa: E731
    if has("model_state.pdparams") or has("model_state.pdparams.index.json"):
        return "paddle"
    first: str | None = None
    if has("model.safetensors.index.json"):
        weight_map = (
            read_json(os.path.join(directory, "model.safetensors.index.json")).get("weight_map") or {}
        )
        first = next(iter(weight_map.values()), None)
    elif has("model.safetensors"):
        first = "model.safetensors"
    if first and os.path.isfile(os.path.join(directory, first)):
        entries, metadata, _ = read_safetensors_header(os.path.join(directory, first))
        fmt = metadata.get("format")
        if fmt in ("np", "pd"):
            return "paddle"
        if fmt in ("pt", "tf", "flax", "mlx"):
            return "hf"
        return "paddle" if any(k.startswith(PADDLE_PREFIXES) for k in entries) else "hf"
    if has("pytorch_model.bin") or has("pytorch_model.bin.index.json"):
        return "hf"
    return None


def fingerprint(directory: str, extra: dict[str, Any]) -> str:
    """sha256 (16 hex) of the config, the weight files' names/sizes/mtimes, and ``extra`` settings."""
    h = hashlib.sha256()
    names = ["config.json", *weight_files(directory)]
    for name in names:
        path = os.path.join(directory, name)
        try:
            st = os.stat(path)
        except OSError:
            continue
        h.update(f"{name}:{st.st_size}:{st.st_mtime_ns};".encode())
    with open(os.path.join(directory, "config.json"), "rb") as f:
        h.update(f.read())
    h.update(json.dumps(extra, sort_keys=True).encode())
    return h.hexdigest()[:16]
