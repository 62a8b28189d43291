"""Incremental detokenization for streaming: text pieces that never split a UTF-8 character.

Byte-level BPE and sentencepiece byte fallback spread one character over several tokens; decoding a
partial sequence gives U+FFFD for the incomplete bytes. :class:`IncrementalDecoder` decodes a small
window of the growing id list (from the last emitted boundary) and emits only the new suffix, holding it
back while it ends in U+FFFD. Decoding the window together with its already-emitted prefix keeps the
spacing rules of the tokenizer (e.g. sentencepiece's leading-space removal) identical to decoding the
whole sequence at once, so the pieces concatenate to exactly ``tokenizer.decode(all_ids)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDecoder:
    """Feed token ids with :meth:`push`; each call returns the newly completed text (maybe ``""``)."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the decode window
        self.read_offset = 0  # ids before this are already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (held back while a character is incomplete)."""
        self.ids.append(int(token_id))
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
            piece = new_text[len(prefix_text) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return piece
        return ""

    def flush(self) -> str:
        """The text still held back at the end of generation (may contain U+FFFD for invalid bytes)."""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""


def stream_text(tokenizer: Any, token_ids: Iterable[int], skip_special_tokens: bool = True) -> Iterator[str]:
    """Turn a stream of token ids into non-empty text pieces (see :class:`IncrementalDecoder`)."""
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens)
    for token in token_ids:
        piece = decoder.push(token)
        if piece:
            yield piece
    tail = decoder.flush()
    if tail:
        yield tail
