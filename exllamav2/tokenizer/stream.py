"""Incremental detokenization that only ever returns complete characters."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import torch

if TYPE_CHECKING:
    from .tokenizer import ExLlamaV2Tokenizer

_REPLACEMENT = "\ufffd"


class ExLlamaV2TokenizerStream:
    """Feed token ids as they are generated; get back only the new, complete text.

    Text is decoded over a short window (`prefix_offset` .. end) and compared with the window's known
    part, so decoders with context (byte fallback, byte-level pieces, the SentencePiece leading-space
    strip) see the same neighbours as a full decode. While the new text ends in U+FFFD a multi-byte
    character is still incomplete and is held back. `finish()` returns whatever is left, so the
    concatenation of all returned pieces equals `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: "ExLlamaV2Tokenizer", decode_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.decode_special_tokens = decode_special_tokens
        self.reset()

    def reset(self) -> None:
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode_list(ids, self.decode_special_tokens)

    def feed(self, ids: int | Iterable[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.flatten().tolist()
        elif isinstance(ids, int):
            ids = [ids]
        self.ids.extend(int(i) for i in ids)
        known = self._text(self.ids[self.prefix_offset : self.read_offset])
        window = self._text(self.ids[self.prefix_offset :])
        if len(window) <= len(known) or window.endswith(_REPLACEMENT):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return window[len(known) :]

    def finish(self) -> str:
        """The held-back tail (possibly an incomplete character, decoded as U+FFFD)."""
        known = self._text(self.ids[self.prefix_offset : self.read_offset])
        window = self._text(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return window[len(known) :]
