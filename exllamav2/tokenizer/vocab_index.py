"""Lookup structures over a tokenizer's vocabulary: single-byte ordinals, prefix -> ids maps and
character tries. Each is built once from the id -> piece list and cached by ExLlamaV2Tokenizer."""

from __future__ import annotations

import gc
import re
from bisect import bisect_left

import numpy as np

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class CharTrie:
    """One node of a character trie: `children` maps a character to the next node, `leaf` lists the
    ids of the pieces that end exactly here (ascending)."""

    __slots__ = ("children", "leaf")

    def __init__(self, children: dict | None = None, leaf: list | None = None):
        self.children: dict[str, CharTrie] = children if children is not None else {}
        self.leaf: list[int] = leaf if leaf is not None else []

    def find(self, text: str) -> CharTrie | None:
        """The node reached by following `text`, or None."""
        node = self
        for ch in text:
            node = node.children.get(ch)
            if node is None:
                return None
        return node


def byte_level_alphabet() -> dict[str, int]:
    """GPT-2 byte-level BPE: the printable stand-in character of each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    kept = set(printable)
    mapping = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in kept:
            mapping[chr(256 + extra)] = b
            extra += 1
    return mapping


def is_byte_level(raw_vocab: dict[str, int], decode_one) -> bool:
    """True when the vocabulary is byte-level BPE: the stand-ins for space and newline are tokens that decode
    to those bytes. (Not every stand-in need be present: bytes that never occur in UTF-8 are often left out;
    a large Unicode vocabulary may hold the stand-ins as ordinary characters, hence the decode check.)"""
    if "Ġ" not in raw_vocab or "Ċ" not in raw_vocab:
        return False
    return decode_one(raw_vocab["Ġ"]) == " " and decode_one(raw_vocab["Ċ"]) == "\n"


def byte_fallback_ids(token_to_id, decode_one) -> frozenset[int]:
    """Ids of the `<0xHH>` tokens when the decoder turns them into bytes (SentencePiece byte fallback), else empty.
    Such a decoder joins each run of them into UTF-8 as a whole, and a run that is not valid UTF-8 becomes one
    U+FFFD per byte, so a later byte token can change the text of the run before it."""
    ids = {b: token_to_id(f"<0x{b:02X}>") for b in range(256)}
    probe = ids[0x41]
    if probe is None or decode_one(probe) != "A":
        return frozenset()
    return frozenset(i for i in ids.values() if i is not None)


def build_id_to_ord(raw_pieces: list[str | None], pieces: list[str], byte_level: bool) -> list[int]:
    """Per id, the one byte the token stands for, or -1. Byte-fallback pieces `<0xHH>` give HH; in a
    byte-level vocabulary a one-character piece gives its byte; otherwise a token whose text is one ASCII
    character gives that character. (The original also returned Latin-1 ordinals such as 233 for 'é',
    which are not the token's UTF-8 bytes; callers join these values with bytes(...).decode('utf-8').)"""
    alphabet = byte_level_alphabet() if byte_level else {}
    out = [-1] * len(pieces)
    for i, (raw, text) in enumerate(zip(raw_pieces, pieces)):
        if not text:
            continue
        if raw is not None:
            if len(raw) == 6 and raw.startswith("<0x"):
                m = _BYTE_FALLBACK.match(raw)
                if m:
                    out[i] = int(m.group(1), 16)
                    continue
            if byte_level and len(raw) == 1 and raw in alphabet:
                out[i] = alphabet[raw]
                continue
        if len(text) == 1 and ord(text) < 128:
            out[i] = ord(text)
    return out


def _successor(prefix: str) -> str | None:
    """The smallest string greater than every string that starts with `prefix` (None: no such string)."""
    while prefix and ord(prefix[-1]) == 0x10FFFF:
        prefix = prefix[:-1]
    if not prefix:
        return None
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def build_prefix_to_ids(pieces: list[str]) -> dict[str, list[int]]:
    """For each distinct non-empty piece, the ascending ids of every token whose piece starts with it
    (itself and tokens sharing its text included)."""
    ids = [i for i, p in enumerate(pieces) if p]
    ids.sort(key=pieces.__getitem__)
    sorted_pieces = [pieces[i] for i in ids]
    sorted_ids = np.asarray(ids, dtype=np.int64)
    n = len(sorted_pieces)
    out: dict[str, list[int]] = {}
    for lo, piece in enumerate(sorted_pieces):
        if piece in out:
            continue
        succ = _successor(piece)
        hi = n if succ is None else bisect_left(sorted_pieces, succ, lo)
        # the sorted order makes every token starting with `piece` one contiguous run from `lo`
        out[piece] = [int(sorted_ids[lo])] if hi - lo == 1 else np.sort(sorted_ids[lo:hi]).tolist()
    return out


def build_prefix_id_to_ids(pieces: list[str], prefix_to_ids: dict[str, list[int]], vocab_size: int) -> dict[int, list[int]]:
    """For each id below `vocab_size`, the ids of every token whose piece starts with this token's piece;
    tokens without a piece (special, unused) map to themselves only."""
    out: dict[int, list[int]] = {}
    for i in range(vocab_size):
        p = pieces[i] if i < len(pieces) else ""
        out[i] = prefix_to_ids[p] if p else [i]
    return out


def build_char_trie(pieces: list[str], case_insensitive: bool = False) -> CharTrie:
    """A trie over every non-empty piece (lower-cased when case_insensitive); leaves hold ids in order."""
    root = CharTrie()
    # the cyclic GC would rescan the growing node graph many times over (~1M nodes for a 262k vocabulary)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for idx, piece in enumerate(pieces):
            if not piece:
                continue
            if case_insensitive:
                piece = piece.lower()
            node = root
            for ch in piece:
                nxt = node.children.get(ch)
                if nxt is None:
                    nxt = node.children[ch] = CharTrie()
                node = nxt
            node.leaf.append(idx)
    finally:
        if gc_was_enabled:
            gc.enable()
    return root
