"""Pretraining token files: Megatron / PaddleNLP ``<prefix>.bin`` + ``<prefix>.idx``, and the legacy npy format.

Layout of the ``.idx`` file (little endian, as ``paddlenlp.data.indexed_dataset.MMapIndexedDataset`` 2.8.1 reads
it)::

    b"MMIDIDX\\x00\\x00"   9 bytes magic
    version             uint64, always 1
    dtype code          uint8 (see ``DTYPE_CODES``)
    n                   uint64, number of sequences
    m                   uint64, length of doc_idx (n + 1 here: one sequence per document)
    sizes               int32[n]   tokens per sequence
    pointers            int64[n]   byte offset of each sequence in the .bin file
    doc_idx             int64[m]   first sequence of each document, then n

The ``.bin`` file is the token ids of all sequences back to back. The legacy format (old ERNIE preprocessing) is
``<prefix>_ids.npy`` (all ids, 1-D) + ``<prefix>_idx.npz`` with ``lens`` (tokens per sequence) and optionally
``docs`` (doc_idx).

In this module a *document* is one sequence (one entry of ``sizes``), as Megatron / PaddleNLP's GPT datasets
treat them; ``doc_idx`` is exposed for files that group several sentences into a document.
"""

from __future__ import annotations

import array
import os
import struct
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from llm.errors import DataError

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
DTYPE_CODES: dict[int, type[np.generic]] = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
    9: np.uint32,
    10: np.uint64,
}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, n sequences, len(doc_idx): 34 bytes
BIN_SUFFIX, IDX_SUFFIX = ".bin", ".idx"
LEGACY_IDS_SUFFIX, LEGACY_IDX_SUFFIX = "_ids.npy", "_idx.npz"


def best_fitting_dtype(vocab_size: int | None) -> type[np.generic]:
    """Token dtype PaddleNLP picks: uint16 when ``vocab_size < 65500``, else int32."""
    return np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32


def dtype_code(dtype: Any) -> int:
    """The ``.idx`` code of a numpy dtype; ValueError for a dtype the format cannot store."""
    dt = np.dtype(dtype)
    for code, candidate in DTYPE_CODES.items():
        if np.dtype(candidate) == dt:
            return code
    raise ValueError(f"token dtype {dt} cannot be stored in an .idx file (choose one of {_dtype_names()})")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _dtype_names() -> str:
    return ", ".join(np.dtype(d).name for d in DTYPE_CODES.values())


class MMapWriter:
    """Write ``<prefix>.bin`` / ``<prefix>.idx``, one sequence per document.

    Both files are written under temporary names in the target directory; :meth:`finalize` (called by a clean
    exit of the ``with`` block) writes the index after the data is complete and renames ``.bin`` first, then
    ``.idx``. An exception inside the block (or :meth:`abort`) removes the temporary files and leaves no output.
    Existing output files are replaced; the old ``.idx`` is removed before the new ``.bin`` lands, so a reader
    never pairs an old index with new data.
    """

    def __init__(self, prefix: str | os.PathLike[str], dtype: Any = np.uint16, buffer_size: int = 1 << 20):
        self.prefix = os.fspath(prefix)
        self.dtype = np.dtype(dtype)
        self._code = dtype_code(self.dtype)
        if self.dtype.kind not in "iu":
            raise ValueError(f"token dtype must be an integer type, got {self.dtype}")
        self._info = np.iinfo(self.dtype)
        directory = os.path.dirname(os.path.abspath(self.prefix))
        os.makedirs(directory, exist_ok=True)
        base = os.path.basename(self.prefix)
        # Temporary names contain neither ".idx" nor "_idx.npz", so find_token_prefixes never lists them.
        fd, self._tmp_bin = tempfile.mkstemp(dir=directory, prefix=f".{base}.", suffix=".tmp-data")
        self._tmp_idx = self._tmp_bin[: -len(".tmp-data")] + ".tmp-index"
        os.chmod(self._tmp_bin, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        self._bin = os.fdopen(fd, "wb", buffering=buffer_size)
        self._sizes = array.array("i")
        self._num_tokens = 0
        self._closed = False

    # ------------------------------------------------------------------ context manager
    def __enter__(self) -> MMapWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.finalize()
        else:
            self.abort()

    # ------------------------------------------------------------------ writing
    @property
    def num_documents(self) -> int:
        """Documents written so far (empty ones are not counted)."""
        return len(self._sizes)

    @property
    def num_tokens(self) -> int:
        """Tokens written so far."""
        return self._num_tokens

    def _as_tokens(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        arr = np.asarray(ids)
        if arr.ndim != 1:
            arr = arr.reshape(-1)
        if arr.size and arr.dtype != self.dtype:
            if arr.dtype.kind not in "iub":
                raise ValueError(f"token ids must be integers, got dtype {arr.dtype}")
            lo, hi = int(arr.min()), int(arr.max())
            if lo < self._info.min or hi > self._info.max:
                bad = lo if lo < self._info.min else hi
                raise ValueError(f"token id {bad} does not fit the file's dtype {self.dtype}")
            arr = arr.astype(self.dtype)
        return np.ascontiguousarray(arr, dtype=self.dtype)

    def add_document(self, ids: Sequence[int] | np.ndarray) -> None:
        """Append one document (a sequence of token ids); empty documents are skipped."""
        self._check_open()
        arr = self._as_tokens(ids)
        if arr.size == 0:
            return
        if arr.size > np.iinfo(np.int32).max:
            raise ValueError(f"a document of {arr.size} tokens exceeds the format's int32 sizes")
        self._bin.write(memoryview(arr).cast("B"))
        self._sizes.append(int(arr.size))
        self._num_tokens += int(arr.size)

    def add_documents(self, tokens: np.ndarray, lengths: Iterable[int]) -> None:
        """Append several documents given as their concatenated ids and their lengths (zeros are skipped)."""
        self._check_open()
        arr = self._as_tokens(tokens)
        lens = [int(n) for n in lengths]
        if sum(lens) != arr.size or any(n < 0 for n in lens):
            raise ValueError(f"lengths sum to {sum(lens)} but {arr.size} tokens were given")
        if arr.size:
            self._bin.write(memoryview(arr).cast("B"))
        self._sizes.extend(n for n in lens if n)
        self._num_tokens += int(arr.size)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"MMapWriter for {self.prefix} is already closed")

    # ------------------------------------------------------------------ closing
    def finalize(self) -> None:
        """Write the index and move both files into place (``.bin`` first, then ``.idx``)."""
        self._check_open()
        bin_path, idx_path = self.prefix + BIN_SUFFIX, self.prefix + IDX_SUFFIX
        try:
            self._bin.flush()
            os.fsync(self._bin.fileno())
            self._bin.close()
            self._write_index()
            if os.path.lexists(idx_path):  # old pair: drop its index before the new data replaces its .bin
                os.remove(idx_path)
            os.replace(self._tmp_bin, bin_path)
            os.replace(self._tmp_idx, idx_path)
        except BaseException:
            if not os.path.exists(self._tmp_bin) and not os.path.exists(idx_path):  # between the renames
                os.remove(bin_path)  # leave no half pair
            self.abort()
            raise
        self._closed = True

    def _write_index(self) -> None:
        sizes = np.frombuffer(self._sizes, dtype=np.int32) if len(self._sizes) else np.zeros(0, np.int32)
        n = len(sizes)
        pointers = np.zeros(n, dtype=np.int64)
        if n > 1:
            np.cumsum(sizes[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self.dtype.itemsize
        doc_idx = np.arange(n + 1, dtype=np.int64)
        with open(self._tmp_idx, "wb") as fh:
            fh.write(_HEADER.pack(INDEX_MAGIC, INDEX_VERSION, self._code, n, n + 1))
            fh.write(sizes.astype("<i4", copy=False).tobytes())
            fh.write(pointers.astype("<i8", copy=False).tobytes())
            fh.write(doc_idx.astype("<i8", copy=False).tobytes())
            fh.flush()
            os.fsync(fh.fileno())

    def abort(self) -> None:
        """Discard everything written: close and delete the temporary files (no output appears)."""
        self._closed = True
        try:
            self._bin.close()
        except OSError:
            pass
        for path in (self._tmp_bin, self._tmp_idx):
            try:
                os.remove(path)
            except FileNotFoundError:
                pass


class MMapTokens:
    """Read-only token file: ``<prefix>.bin`` + ``<prefix>.idx``, or legacy ``<prefix>_ids.npy`` + ``_idx.npz``.

    Everything is memory-mapped; nothing is read in full when opening (the legacy format computes its
    offsets from ``lens``). ``len(t)`` is the number of documents, ``t.sizes`` their lengths (int32),
    ``t.get(i, offset, length)`` a view of document ``i``'s tokens. Picklable (reopens by prefix).
    """

    def __init__(self, prefix: str | os.PathLike[str]):
        self.prefix = os.fspath(prefix)
        self._open()

    def __getstate__(self) -> str:
        return self.prefix

    def __setstate__(self, prefix: str) -> None:
        self.prefix = prefix
        self._open()

    def _open(self) -> None:
        p = self.prefix
        bin_path, idx_path = p + BIN_SUFFIX, p + IDX_SUFFIX
        ids_path, npz_path = p + LEGACY_IDS_SUFFIX, p + LEGACY_IDX_SUFFIX
        self._starts: np.ndarray | None = None
        if os.path.isfile(bin_path) and os.path.isfile(idx_path):
            self.format = "mmap"
            self._open_mmap(bin_path, idx_path)
        elif os.path.isfile(ids_path) and os.path.isfile(npz_path):
            self.format = "legacy"
            self._open_legacy(ids_path, npz_path)
        else:
            for have, want in (
                (bin_path, idx_path),
                (idx_path, bin_path),
                (ids_path, npz_path),
                (npz_path, ids_path),
            ):
                if os.path.isfile(have):
                    raise DataError(
                        f"missing file {want!r} (its pair {os.path.basename(have)!r} exists)", want
                    )
            raise DataError(
                f"no token files for prefix {p!r}: expected {p}{BIN_SUFFIX} + {p}{IDX_SUFFIX} "
                f"(or legacy {p}{LEGACY_IDS_SUFFIX} + {p}{LEGACY_IDX_SUFFIX})"
            )
        self._num_tokens: int | None = None

    def _open_mmap(self, bin_path: str, idx_path: str) -> None:
        idx_bytes = os.path.getsize(idx_path)
        with open(idx_path, "rb") as fh:
            head = fh.read(_HEADER.size)
        if len(head) < _HEADER.size:
            raise DataError(
                f"truncated index: {idx_bytes} bytes, shorter than the {_HEADER.size}-byte header", idx_path
            )
        magic, version, code, n, m = _HEADER.unpack(head)
        if magic != INDEX_MAGIC:
            raise DataError(
                f"not an MMapIndexedDataset index (magic {magic!r}, expected {INDEX_MAGIC!r})", idx_path
            )
        if version != INDEX_VERSION:
            raise DataError(f"unsupported index version {version} (expected {INDEX_VERSION})", idx_path)
        if code not in DTYPE_CODES:
            raise DataError(f"unknown dtype code {code} (known: {sorted(DTYPE_CODES)})", idx_path)
        self.dtype = np.dtype(DTYPE_CODES[code])
        expected = _HEADER.size + 12 * n + 8 * m
        if idx_bytes != expected:
            what = "truncated" if idx_bytes < expected else "inconsistent"
            raise DataError(
                f"{what} index: {idx_bytes} bytes, but its header ({n} sequences, {m} doc_idx entries) "
                f"needs {expected}",
                idx_path,
            )
        if n:
            idx_map = np.memmap(idx_path, dtype=np.uint8, mode="r")
            self._sizes = np.frombuffer(idx_map, dtype="<i4", count=n, offset=_HEADER.size)
            self._pointers = np.frombuffer(idx_map, dtype="<i8", count=n, offset=_HEADER.size + 4 * n)
            self._doc_idx = np.frombuffer(idx_map, dtype="<i8", count=m, offset=_HEADER.size + 12 * n)
            data_bytes = int(self._pointers[-1]) + int(self._sizes[-1]) * self.dtype.itemsize
        else:
            self._sizes = np.zeros(0, np.int32)
            self._pointers = np.zeros(0, np.int64)
            with open(idx_path, "rb") as fh:
                fh.seek(_HEADER.size)
                self._doc_idx = np.frombuffer(fh.read(8 * m), dtype="<i8")
            data_bytes = 0
        if m and int(self._doc_idx[-1]) != n:
            raise DataError(
                f"inconsistent index: doc_idx ends at {int(self._doc_idx[-1])}, not at {n}", idx_path
            )
        bin_bytes = os.path.getsize(bin_path)
        if bin_bytes != data_bytes:
            what = "truncated" if bin_bytes < data_bytes else "inconsistent"
            raise DataError(
                f"{what} data file: {bin_bytes} bytes, but {os.path.basename(idx_path)} describes {data_bytes}",
                bin_path,
            )
        if bin_bytes:
            self._tokens = np.memmap(bin_path, dtype=self.dtype, mode="r")
        else:
            self._tokens = np.zeros(0, self.dtype)

    def _open_legacy(self, ids_path: str, npz_path: str) -> None:
        try:
            self._tokens = np.load(ids_path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as err:
            raise DataError(f"unreadable or truncated token array: {err}", ids_path) from None
        if self._tokens.ndim != 1 or self._tokens.dtype.kind not in "iu":
            raise DataError(
                f"expected a 1-D integer array, got shape {self._tokens.shape} {self._tokens.dtype}", ids_path
            )
        self.dtype = self._tokens.dtype
        try:
            with np.load(npz_path, allow_pickle=False) as npz:
                if "lens" not in npz.files:
                    raise DataError(f"no 'lens' array (found {sorted(npz.files)})", npz_path)
                lens = np.asarray(npz["lens"])
                docs = np.asarray(npz["docs"]) if "docs" in npz.files else None
        except DataError:
            raise
        except Exception as err:  # noqa: BLE001 - zipfile/npy errors of a damaged archive
            raise DataError(f"unreadable or truncated index archive: {err}", npz_path) from None
        if lens.ndim != 1 or (lens.size and (lens.dtype.kind not in "iu" or int(lens.min()) < 0)):
            raise DataError("'lens' must be a 1-D array of non-negative integers", npz_path)
        self._sizes = lens.astype(np.int32)
        self._starts = np.zeros(len(lens) + 1, dtype=np.int64)
        np.cumsum(lens, dtype=np.int64, out=self._starts[1:])
        total = int(self._starts[-1])
        if total != self._tokens.size:
            what = "truncated" if self._tokens.size < total else "inconsistent"
            raise DataError(
                f"{what} token array: {self._tokens.size} ids, but {os.path.basename(npz_path)} lens sum to {total}",
                ids_path,
            )
        self._doc_idx = np.arange(len(lens) + 1, dtype=np.int64) if docs is None else docs.astype(np.int64)
        self._pointers = None
        self._num_tokens = total

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self._sizes)

    def __repr__(self) -> str:
        return f"MMapTokens({self.prefix!r}, format={self.format}, documents={len(self)}, dtype={self.dtype})"

    @property
    def sizes(self) -> np.ndarray:
        """Length of every document (int32, read-only view)."""
        return self._sizes

    @property
    def doc_idx(self) -> np.ndarray:
        """The file's document index (int64; ``0..len`` for files written here)."""
        return self._doc_idx

    @property
    def num_tokens(self) -> int:
        """Total number of tokens."""
        if self._num_tokens is None:
            self._num_tokens = int(self._sizes.sum(dtype=np.int64))
        return self._num_tokens

    def _start(self, doc: int) -> int:
        if self._starts is not None:
            return int(self._starts[doc])
        return int(self._pointers[doc]) // self.dtype.itemsize

    def get(self, doc: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """View of document ``doc``'s tokens ``[offset, offset + length)`` (to its end when ``length`` is None)."""
        n = len(self)
        doc = int(doc)
        if doc < 0:
            doc += n
        if not 0 <= doc < n:
            raise IndexError(f"document {doc} out of range for {n} documents in {self.prefix}")
        size = int(self._sizes[doc])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(
                f"tokens [{offset}, {offset + length}) out of range for document {doc} of {size} tokens"
            )
        start = self._start(doc) + offset
        return self._tokens[start : start + length]

    def __getitem__(self, doc: int) -> np.ndarray:
        return self.get(doc)


def find_token_prefixes(input_dir: str | os.PathLike[str]) -> list[str]:
    """Sorted prefixes of the token files in ``input_dir`` (names ending ``.idx`` or ``_idx.npz``, suffix stripped).

    Mirrors PaddleNLP's ``run_pretrain.py`` discovery; raises DataError when the folder is missing or has none.
    """
    folder = os.fspath(input_dir)
    if not os.path.isdir(folder):
        raise DataError("input_dir is not a directory", folder)
    prefixes = set()
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        for suffix in (IDX_SUFFIX, LEGACY_IDX_SUFFIX):
            if name.endswith(suffix) and len(name) > len(suffix):
                prefixes.add(path[: -len(suffix)])
    if not prefixes:
        raise DataError(
            f"no token files (*{IDX_SUFFIX} + *{BIN_SUFFIX}, or legacy *{LEGACY_IDX_SUFFIX} + *{LEGACY_IDS_SUFFIX}); "
            "create them with `python -m llm.tools.preprocess`",
            folder,
        )
    return sorted(prefixes)
