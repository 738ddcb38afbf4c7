"""Incremental detokenization that only ever returns complete characters."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Iterator

import torch

from .inputs import id_list

if TYPE_CHECKING:
    from .tokenizer import ExLlamaV2Tokenizer

_REPLACEMENT = "\ufffd"
_MAX_TRIES = 8  # window decodes per feed while looking back for text that is final


class ExLlamaV2TokenizerStream:
    """Feed token ids as they are generated; get back only the new, complete text.

    Text is decoded over a short window (`prefix_offset` .. end) and compared with the window's known
    part, so decoders with context (byte fallback, byte-level pieces, the SentencePiece leading-space
    strip) see the same neighbours as a full decode. New text is held back while it may still change:
    while it ends in U+FFFD (a multi-byte character still incomplete) and while the last token is a
    byte-fallback token (a later byte can turn the whole byte run into U+FFFDs). `finish()` returns
    whatever is left, so the concatenation of all returned pieces equals `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: "ExLlamaV2Tokenizer", decode_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.decode_special_tokens = decode_special_tokens
        self.reset()

    def reset(self) -> None:
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def start_after(self, ids: Iterable[int] | torch.Tensor, window: int | None = None) -> None:
        """Restart with `ids` as text already shown (a prompt, or the tokens kept by a rewind): they are the decoding
        context of what is fed next, and none of their text is returned, not even a tail that feed() would have
        held back. `window`: keep only that many of them as context."""
        self.ids = id_list(ids, "stream.start_after")
        self.prefix_offset = 0 if window is None else max(0, len(self.ids) - window)
        self.read_offset = len(self.ids)

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode_list(ids, self.decode_special_tokens)

    def feed(self, ids: int | Iterable[int] | torch.Tensor) -> str:
        self.ids.extend(id_list(ids, "stream.feed"))
        known = self._text(self.ids[self.prefix_offset : self.read_offset])
        for end in self._final_ends():
            window = self._text(self.ids[self.prefix_offset : end])
            if window.endswith(_REPLACEMENT):
                continue
            if len(window) <= len(known):
                return ""
            self.prefix_offset, self.read_offset = self.read_offset, end
            return window[len(known) :]
        return ""

    def _final_ends(self) -> Iterator[int]:
        """Ends of the ids past read_offset after which the text may be final, latest first: not inside a run of
        byte-fallback tokens. The caller also skips ends whose text ends in U+FFFD. Feeding many ids at once thus
        returns what feeding them one by one would (up to _MAX_TRIES decodes back)."""
        flags = self.tokenizer.byte_fallback_flags(self.ids[self.read_offset :], self.decode_special_tokens)
        in_run, ends = False, []
        for n, flag in enumerate(flags, self.read_offset + 1):
            if flag is not None:
                in_run = flag
            if not in_run:
                ends.append(n)
        return iter(ends[: -_MAX_TRIES - 1 : -1])

    def finish(self) -> str:
        """The held-back tail (possibly an incomplete character, decoded as U+FFFD)."""
        known = self._text(self.ids[self.prefix_offset : self.read_offset])
        window = self._text(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return window[len(known) :]
