"""Weight files without frameworks in the way: lazy readers, a streaming safetensors writer, dtype casts.

* **safetensors** are parsed here (JSON header + ``np.memmap``), so reading one tensor touches only its bytes
  and bfloat16 (which numpy lacks) is kept bit-exact as ``uint16``. Nothing is unpickled.
* **torch ``.bin``** files are read with ``torch.load(weights_only=True, mmap=True)``: no arbitrary objects
  are unpickled, and tensors stay on disk until used.
* **paddle ``.pdparams``** files are pickles; ``paddle.load`` reads them only when the user points at them.

Arrays travel as :class:`Tensor` (``array``, logical ``dtype``); a bfloat16 array is a ``uint16`` view.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from llm.errors import ModelError

FLOAT_DTYPES = ("float32", "float16", "bfloat16")
_ST_TO_NP = {
    "F64": ("float64", np.float64),
    "F32": ("float32", np.float32),
    "F16": ("float16", np.float16),
    "BF16": ("bfloat16", np.uint16),
    "I64": ("int64", np.int64),
    "I32": ("int32", np.int32),
    "I16": ("int16", np.int16),
    "I8": ("int8", np.int8),
    "U8": ("uint8", np.uint8),
    "BOOL": ("bool", np.bool_),
}
_LOGICAL_TO_ST = {logical: st for st, (logical, _) in _ST_TO_NP.items()}
_NP_OF = {logical: np_type for _, (logical, np_type) in _ST_TO_NP.items()}


@dataclass
class Tensor:
    """A numpy array plus its logical dtype (``bfloat16`` arrays are stored as ``uint16``)."""

    array: np.ndarray
    dtype: str

    @property
    def is_float(self) -> bool:
        return self.dtype in ("float64", "float32", "float16", "bfloat16")


# --------------------------------------------------------------------------------------------------
# dtype casts
# --------------------------------------------------------------------------------------------------
def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """Exact bfloat16 (uint16 bits) -> float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits with round-to-nearest-even (NaN stays NaN), like torch's cast."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    bits = values.view(np.uint32)
    rounded = ((bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x0040).astype(np.uint16)
    return rounded


def cast(tensor: Tensor, dtype: str | None) -> Tensor:
    """Cast a floating tensor to ``dtype`` (``None`` keeps it); integer/bool tensors are never cast."""
    if dtype is None or not tensor.is_float or tensor.dtype == dtype:
        return tensor
    if dtype not in FLOAT_DTYPES:
        raise ModelError(f"unsupported dtype '{dtype}'; expected one of {', '.join(FLOAT_DTYPES)}")
    arr = tensor.array
    f32 = bf16_to_f32(arr) if tensor.dtype == "bfloat16" else arr.astype(np.float32, copy=False)
    if dtype == "float32":
        return Tensor(f32, "float32")
    if dtype == "float16":
        return Tensor(f32.astype(np.float16), "float16")
    return Tensor(f32_to_bf16(f32), "bfloat16")


def to_float32(tensor: Tensor) -> np.ndarray:
    """A float32 copy/view of any floating tensor (for comparisons and arithmetic)."""
    return cast(tensor, "float32").array if tensor.is_float else tensor.array


def itemsize(dtype: str) -> int:
    """Bytes per element of a logical dtype."""
    return np.dtype(_NP_OF.get(dtype, np.uint16)).itemsize


def from_numpy(arr: np.ndarray, paddle_u16_is_bf16: bool = False) -> Tensor:
    """Wrap an array; with ``paddle_u16_is_bf16`` a ``uint16`` array is bfloat16 (paddle's convention)."""
    if arr.dtype == np.uint16 and paddle_u16_is_bf16:
        return Tensor(arr, "bfloat16")
    name = np.dtype(arr.dtype).name
    if name not in _NP_OF and name != "uint16":
        raise ModelError(f"unsupported tensor dtype {name}")
    return Tensor(arr, name)


# --------------------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------------------
_ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1}
_ST_ITEMSIZE.update({"BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1})
TRUNCATED = "truncated download?"


def first_line(err: BaseException) -> str:
    """``Type: first line of the message`` (the type alone when the message is empty)."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


def read_safetensors_header(path: str) -> tuple[dict[str, Any], dict[str, str], int]:
    """(tensor entries, ``__metadata__``, byte offset of the data section) of a safetensors file.

    The header is checked against the file: every tensor's byte range must match its shape and dtype and lie
    inside the data section, so a truncated or corrupt file is one :class:`ModelError` here, not a crash later.
    """
    try:
        total = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ModelError(
                    f"{path}: not a safetensors file ({total} bytes, shorter than its 8-byte header "
                    f"length; {TRUNCATED})"
                )
            (size,) = struct.unpack("<Q", raw)
            if size > 100_000_000:
                raise ValueError(f"header length {size} is implausible")
            if 8 + size > total:
                raise ModelError(
                    f"{path}: the header needs {size} bytes but only {total - 8} follow ({TRUNCATED})"
                )
            header = json.loads(f.read(size))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, ValueError) as err:
        raise ModelError(f"{path}: not a readable safetensors file ({err})") from None
    metadata = header.pop("__metadata__", None) or {}
    data_size, needed = total - 8 - size, 0
    for name, entry in header.items():
        try:
            begin, end = (int(x) for x in entry["data_offsets"])
            count = int(np.prod([int(d) for d in entry["shape"]], dtype=np.int64))
            dtype = entry["dtype"]
        except (KeyError, TypeError, ValueError):
            raise ModelError(
                f"{path}: corrupt safetensors header (entry '{name}' lacks dtype/shape/offsets)"
            ) from None
        width = _ST_ITEMSIZE.get(dtype)
        if begin < 0 or end < begin or (width is not None and end - begin != count * width):
            raise ModelError(
                f"{path}: corrupt safetensors header ('{name}' is {dtype}{list(entry['shape'])} but spans bytes "
                f"{begin}..{end})"
            )
        needed = max(needed, end)
    if needed > data_size:
        raise ModelError(
            f"{path}: data section is {data_size} bytes, the header needs {needed} ({TRUNCATED})"
        )
    return header, metadata, 8 + size


class SafetensorsFile:
    """Lazy reader: ``keys()``, ``info(key)`` and ``get(key)`` over an ``np.memmap`` of the file.

    ``u16_is_bf16``: paddle writes bfloat16 tensors as ``U16``; set it when reading paddle files.
    """

    def __init__(self, path: str, u16_is_bf16: bool = False) -> None:
        self.path = path
        self.entries, self.metadata, self._offset = read_safetensors_header(path)
        self._u16_is_bf16 = u16_is_bf16
        self._mmap: np.memmap | None = None

    def keys(self) -> list[str]:
        return list(self.entries)

    def _logical(self, st_dtype: str) -> tuple[str, Any]:
        if st_dtype == "U16":
            return ("bfloat16" if self._u16_is_bf16 else "uint16"), np.uint16
        if st_dtype not in _ST_TO_NP:
            raise ModelError(f"{self.path}: unsupported safetensors dtype {st_dtype}")
        return _ST_TO_NP[st_dtype]

    def info(self, key: str) -> tuple[tuple[int, ...], str]:
        entry = self.entries[key]
        return tuple(entry["shape"]), self._logical(entry["dtype"])[0]

    def get(self, key: str) -> Tensor:
        entry = self.entries[key]
        logical, np_type = self._logical(entry["dtype"])
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin, end = entry["data_offsets"]
        raw = self._mmap[self._offset + begin : self._offset + end]
        arr = raw.view(np_type).reshape(entry["shape"])
        return Tensor(arr, logical)

    def close(self) -> None:
        self._mmap = None


@dataclass
class Pending:
    """One tensor to write: its name, shape and logical dtype are known before ``make()`` computes it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    make: Callable[[], Tensor]


def write_safetensors(path: str, items: Iterable[Pending], metadata: dict[str, str]) -> int:
    """Stream tensors into a safetensors file, computing one at a time; returns the data size in bytes.

    Logical ``bfloat16`` is written as ``BF16`` when ``metadata['format'] == 'pt'`` (torch) and as
    ``U16`` otherwise (paddle's ``np`` convention).
    """
    items = list(items)
    torch_style = metadata.get("format") == "pt"
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    sizes = []
    for item in items:
        if item.dtype == "bfloat16":
            st = "BF16" if torch_style else "U16"
        elif item.dtype in _LOGICAL_TO_ST:
            st = _LOGICAL_TO_ST[item.dtype]
        else:
            raise ModelError(f"cannot write {item.name}: unsupported dtype {item.dtype}")
        nbytes = (
            int(np.prod(item.shape, dtype=np.int64)) * np.dtype(_NP_OF.get(item.dtype, np.uint16)).itemsize
        )
        header[item.name] = {
            "dtype": st,
            "shape": list(item.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        sizes.append(nbytes)
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for item, nbytes in zip(items, sizes):
            tensor = item.make()
            if tuple(tensor.array.shape) != tuple(item.shape) or tensor.dtype != item.dtype:
                raise ModelError(
                    f"internal error writing {item.name}: got {tensor.dtype}{list(tensor.array.shape)}, "
                    f"expected {item.dtype}{list(item.shape)}"
                )
            data = np.ascontiguousarray(tensor.array)
            if data.dtype.byteorder == ">":
                data = data.astype(data.dtype.newbyteorder("<"))
            if data.nbytes != nbytes:
                raise ModelError(
                    f"internal error writing {item.name}: {data.nbytes} bytes, expected {nbytes}"
                )
            f.write(memoryview(data).cast("B"))
            del tensor, data
    return offset


def write_state(path: str, items: Iterable[Pending], safe: bool) -> None:
    """Write a paddle state dict: safetensors with ``np`` metadata (streamed), or a ``.pdparams`` pickle."""
    if safe:
        write_safetensors(path, items, {"format": "np"})
        return
    import paddle

    paddle.save({item.name: item.make().array for item in items}, path)


# --------------------------------------------------------------------------------------------------
# torch .bin and paddle .pdparams (pickle-based; only files the user pointed at)
# --------------------------------------------------------------------------------------------------
def check_pickle_file(path: str) -> None:
    """Cheap completeness checks of a pickle-based weight file (no unpickling): an empty file, a torch zip
    archive without its end-of-archive record, or a paddle pickle that does not end with pickle's STOP."""
    try:
        total = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(4)
            f.seek(max(0, total - 65_558))  # the zip end record (22 bytes + a comment of up to 64 KiB)
            tail = f.read()
    except OSError as err:
        raise ModelError(f"{path}: cannot read ({err})") from None
    if total == 0:
        raise ModelError(f"{path}: empty file (0 bytes; {TRUNCATED})")
    if head == b"PK\x03\x04":
        if b"PK\x05\x06" not in tail:
            raise ModelError(f"{path}: zip archive without its end record: the file is cut off ({TRUNCATED})")
    elif path.endswith(".pdparams") and not tail.endswith(b"."):
        raise ModelError(f"{path}: the pickle is cut off (no end marker after {total} bytes; {TRUNCATED})")


class TorchBinFile:
    """``torch.load(weights_only=True, mmap=True)`` reader; legacy (non-zip) files are loaded whole."""

    def __init__(self, path: str) -> None:
        import torch

        self.path = path
        check_pickle_file(path)
        with open(path, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"
        try:
            self._state = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
        except Exception as err:  # noqa: BLE001 - torch raises many types for corrupt/unsafe pickles
            raise ModelError(
                f"{path}: cannot read torch checkpoint ({first_line(err)}; truncated or corrupt file?)"
            ) from None
        if not isinstance(self._state, dict):
            raise ModelError(f"{path}: expected a state dict, found {type(self._state).__name__}")
        self.metadata: dict[str, str] = {"format": "pt"}

    def keys(self) -> list[str]:
        return [k for k, v in self._state.items() if hasattr(v, "dtype")]

    def info(self, key: str) -> tuple[tuple[int, ...], str]:
        value = self._state[key]
        return tuple(value.shape), str(value.dtype).replace("torch.", "")

    def get(self, key: str) -> Tensor:
        import torch

        value = self._state[key]
        if value.dtype == torch.bfloat16:
            return Tensor(value.contiguous().view(torch.int16).numpy().view(np.uint16), "bfloat16")
        arr = value.contiguous().numpy()
        return from_numpy(arr)

    def close(self) -> None:
        self._state = {}


class PdparamsFile:
    """``paddle.load(return_numpy=True)`` of a user-given ``.pdparams`` file (a pickle: loaded eagerly)."""

    def __init__(self, path: str) -> None:
        import paddle

        self.path = path
        check_pickle_file(path)
        try:
            state = paddle.load(path, return_numpy=True)
        except Exception as err:  # noqa: BLE001 - paddle raises many types for corrupt pickles
            raise ModelError(
                f"{path}: cannot read paddle weights ({first_line(err)}; truncated or corrupt file?)"
            ) from None
        if not isinstance(state, dict):
            raise ModelError(f"{path}: expected a state dict, found {type(state).__name__}")
        self._state = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
        self.metadata: dict[str, str] = {"format": "np"}

    def keys(self) -> list[str]:
        return list(self._state)

    def info(self, key: str) -> tuple[tuple[int, ...], str]:
        tensor = self.get(key)
        return tuple(tensor.array.shape), tensor.dtype

    def get(self, key: str) -> Tensor:
        return from_numpy(self._state[key], paddle_u16_is_bf16=True)

    def close(self) -> None:
        self._state = {}


def open_weight_file(path: str, paddle_layout: bool = False) -> SafetensorsFile | TorchBinFile | PdparamsFile:
    """Open one weight file by extension (``.safetensors``, ``.bin``/``.pt``/``.pth``, ``.pdparams``)."""
    if path.endswith(".safetensors"):
        return SafetensorsFile(path, u16_is_bf16=paddle_layout)
    if path.endswith(".pdparams"):
        return PdparamsFile(path)
    if path.endswith((".bin", ".pt", ".pth")):
        return TorchBinFile(path)
    raise ModelError(f"{path}: unknown weight file type (expected .safetensors, .bin or .pdparams)")


def file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0
