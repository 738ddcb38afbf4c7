"""Paged attention in plain torch, for the dynamic generator.

A step packs every active sequence's new tokens into one row of the forward: hidden states are (1, T, hidden),
T = sum of the sequences' new-token counts, so the linear layers see no padding at all. The KV cache is an
`ExLlamaV2Cache` (or a quantized cache, cache_q.py, read through the `quant_paged_attention` op) with batch 1
whose sequence axis is carved into pages of `page_size` tokens; page p holds positions [p * page_size,
(p + 1) * page_size). Each sequence has a block table (its page indices in order) and
`past_len` tokens already in the cache.

Attention runs per sequence, over exactly its own keys (a slice of the cache when its pages are consecutive,
else gathered), so a request's result is the same alone or in any batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ops
from .attn_params import Params
from .cache_q import has_quant_pages
from .ops.torch_ref.attention import window_mask


@dataclass
class _Sequence:
    """One sequence of a packed forward: its new tokens are packed[start:start + q_len] and it attends to its own
    kv_len keys, read as a slice of consecutive cache slots from `slot_start` or gathered from `slots`."""
    start: int
    q_len: int
    kv_len: int
    slot_start: int | None
    slots: torch.Tensor | None
    masks: dict

    def mask(self, sliding_window: int, device) -> torch.Tensor | None:
        """None for plain causal attention over all its keys (the caller passes a causal flag); a bool mask
        (1, 1, q_len, kv_len) when a sliding window cuts some off."""
        key = (sliding_window, device)
        if key not in self.masks:
            self.masks[key] = window_mask(self.kv_len, self.q_len, sliding_window, device)
        return self.masks[key]


class PagedParams(Params):
    """Attention parameters of one packed, paged forward.

    :param block_tables: per sequence, the list of its cache pages in order
    :param past_lens: per sequence, the tokens already in the cache
    :param q_lens: per sequence, the new tokens it feeds in this forward (packed in this order)
    :param page_size: tokens per page
    """

    def __init__(self, block_tables: list[list[int]], past_lens: list[int], q_lens: list[int], page_size: int,
                 device="cpu"):
        if not (len(block_tables) == len(past_lens) == len(q_lens)) or not q_lens:
            raise ValueError("PagedParams: block_tables, past_lens and q_lens must be non-empty and of equal length")
        if min(q_lens) < 1:
            raise ValueError(f"PagedParams: every sequence must feed at least one token, got q_lens={q_lens}")
        for i, (bt, p, q) in enumerate(zip(block_tables, past_lens, q_lens)):
            if p + q > len(bt) * page_size:
                raise ValueError(f"PagedParams: sequence {i} needs {p + q} positions but holds {len(bt)} pages "
                                 f"of {page_size}")
        total = sum(q_lens)
        super().__init__(1, total, 0, paged=True)
        self.page_size = page_size
        self.num_sequences = len(q_lens)
        self.q_lens = list(q_lens)
        self.past_lens = list(past_lens)
        # per sequence, the positions of its input beyond this chunk (a prompt prefilled in chunks), so that
        # length-dependent RoPE rotates every chunk with the whole prompt's frequencies (as Params.rope_ahead)
        self.rope_ahead_of: list[int] | None = None
        # positions, write slots and last-token indices are worked out in Python and uploaded once: a decode step's
        # handful of sequences would otherwise cost a dozen small tensor ops per step
        self.block_tables = [list(pages) for pages in block_tables]
        max_pages = max(len(bt) for bt in block_tables)
        self.block_index = torch.tensor([bt + [0] * (max_pages - len(bt)) for bt in self.block_tables],
                                        dtype=torch.long, device=device)
        self.num_pages = torch.tensor([len(p) for p in block_tables], device=device)
        self.cache_seqlens = torch.tensor(past_lens, dtype=torch.long, device=device)
        positions, slots, last = [], [], []
        for pages, p, q in zip(self.block_tables, past_lens, q_lens):
            positions.extend(range(p, p + q))
            slots.extend(pages[t // page_size] * page_size + t % page_size for t in range(p, p + q))
            last.append(len(positions) - 1)
        self.positions = torch.tensor(positions, dtype=torch.long, device=device).unsqueeze(0)
        self.slots = torch.tensor(slots, dtype=torch.long, device=device)
        self.last_token_index = torch.tensor(last, dtype=torch.long, device=device)  # packed index of each last token

        # every sequence attends alone, to exactly its own keys: its result cannot depend on what else is in the
        # batch (padding it to a neighbour's length changes the attention kernel's reduction order)
        self.sequences: list[_Sequence] = []
        start = 0
        for i, (pages, p, q) in enumerate(zip(block_tables, past_lens, q_lens)):
            kv_len = p + q
            used = pages[:-(-kv_len // page_size)]
            slot_start = slots = None
            if used == list(range(used[0], used[0] + len(used))):
                slot_start = used[0] * page_size
            else:
                key_pos = torch.arange(kv_len, device=device)
                slots = self.block_index[i, key_pos // page_size] * page_size + key_pos % page_size
            self.sequences.append(_Sequence(start, q, kv_len, slot_start, slots, {}))
            start += q
        self.max_position = max(p + q for p, q in zip(past_lens, q_lens))
        # one new token per sequence: ops.paged_attention may then run every sequence in one decode call, which
        # computes each exactly as the per-sequence path does (tests/test_dynamic_paging.py)
        self.decode_only = all(q == 1 for q in q_lens)
        self.kv_lens = self.cache_seqlens + 1 if self.decode_only else None

    def get_positions(self, device) -> tuple[torch.Tensor, int]:
        return self.positions.to(device), self.max_position

    def get_rope(self, rope, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """As Params.get_rope, but length-dependent RoPE (longrope, dynamic NTK: `rope.dynamic`) takes each
        sequence's frequencies from that sequence's own length, as a forward of the sequence alone would: never
        from the longest sequence packed beside it (a short job would otherwise switch to longrope's long factors
        whenever a long job shares its step)."""
        if not getattr(rope, "dynamic", False):
            return super().get_rope(rope, device, dtype)
        key = ("rope", id(rope), str(device), dtype)
        hit = self._cache.get(key)
        if hit is None:
            pos = self.positions[0].to(device)
            cos, sin, start = [], [], 0
            for p, q, ahead in zip(self.past_lens, self.q_lens, self.rope_ahead_of or [0] * self.num_sequences):
                c, s = rope.tables(p + q + ahead, device, dtype)
                cos.append(c[pos[start:start + q]])
                sin.append(s[pos[start:start + q]])
                start += q
            hit = self._cache[key] = (torch.cat(cos).unsqueeze(0).unsqueeze(2), torch.cat(sin).unsqueeze(0).unsqueeze(2))
        return hit

    def get_attn_mask(self, device, sliding_window: int = 0):
        raise RuntimeError("PagedParams: masks are per group; use paged_attention()")


class PagedDecodeParams(Params):
    """Attention parameters of a decode-only paged forward (one new token per sequence), built from device tensors
    alone so that a compiled step takes them as inputs: no Python lists, no host sync, the same shapes every step
    for a given number of sequences.

    :param block_index: (B, P) long, each sequence's cache pages in order (padded rows are never read)
    :param past: (B,) long, the tokens each sequence already holds in the cache
    :param page_size: tokens per page
    :param max_positions: an upper bound on every position (the rotary tables are built that long)
    """

    sequences = None  # tells ops.paged_attention to take the decode-only path

    def __init__(self, block_index: torch.Tensor, past: torch.Tensor, page_size: int, max_positions: int):
        b = past.shape[0]
        super().__init__(1, b, 0, paged=True)
        self.page_size = page_size
        self.num_sequences = b
        self.block_index = block_index
        self.cache_seqlens = past
        self.kv_lens = past + 1
        self.positions = past.view(1, b)
        page = block_index.gather(1, (past // page_size).view(b, 1)).view(b)
        self.slots = page * page_size + past % page_size
        self.max_position = max_positions

    def get_positions(self, device) -> tuple[torch.Tensor, int]:
        return self.positions.to(device), self.max_position

    def get_attn_mask(self, device, sliding_window: int = 0):
        raise RuntimeError("PagedDecodeParams: attention runs per sequence; use paged_attention()")


def paged_attention(module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache,
                    params: PagedParams) -> torch.Tensor:
    """q (1, T, hq, d), k and v (1, T, hk, d) after RoPE. Writes k/v into the pages and returns
    (1, T, hq * d)."""
    if q.shape[0] != 1 or q.shape[1] != params.seq_len:
        raise ValueError(f"paged attention expects packed input (1, {params.seq_len}, ...), got {tuple(q.shape)}")
    if cache is None or cache.batch_size != 1:
        raise ValueError("paged attention needs a cache with batch_size=1")
    if has_quant_pages(cache):  # codes and scales, dequantised inside attention
        return ops.quant_paged_attention(q, k, v, cache.paged_layer(module.layer_idx), params,
                                         module.sliding_window or 0, module.scaling, module.softcap)
    kc, vc = cache.get_kv_state(module.layer_idx, 1, 0, 0)
    return ops.paged_attention(q, k, v, kc, vc, params, module.sliding_window or 0, module.scaling, module.softcap)
