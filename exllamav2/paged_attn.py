"""Paged attention in plain torch, for the dynamic generator.

A step packs every active sequence's new tokens into one row of the forward: hidden states are (1, T, hidden),
T = sum of the sequences' new-token counts, so the linear layers see no padding at all. The KV cache is an
`ExLlamaV2Cache` with batch 1 whose sequence axis is carved into pages of `page_size` tokens; page p holds
positions [p * page_size, (p + 1) * page_size). Each sequence has a block table (its page indices in order) and
`past_len` tokens already in the cache.

Attention runs per group of sequences that feed the same number of tokens (all decoding sequences form one
group): their queries are gathered to (n, q_len), their keys and values gathered from the pages to (n, L) with a
mask for causality, length and sliding window, and one SDPA call covers the group.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import ops
from .attn_params import Params


@dataclass
class _Group:
    q_index: torch.Tensor  # (n, q_len) indices into the packed tokens
    kv_slots: torch.Tensor  # (n, L) flat cache slots of every key position
    key_pos: torch.Tensor  # (L,) key positions 0..L-1
    q_pos: torch.Tensor  # (n, q_len) query positions
    kv_len: torch.Tensor  # (n,) keys valid after this step
    masks: dict  # (sliding window, device) -> bool mask (n, 1, q_len, L)
    # one sequence whose keys sit in consecutive slots from this one: read as a slice, not gathered
    slot_start: int | None = None
    # the group's tokens are the whole packed row, in order: no gather of queries, no scatter of outputs
    whole: bool = False

    def mask(self, sliding_window: int, device) -> torch.Tensor | None:
        """None when one sequence attends causally to all its keys (the caller then uses a causal flag)."""
        if self.slot_start is not None and (not sliding_window or self.key_pos.shape[0] <= sliding_window):
            return None
        key = (sliding_window, str(device))
        if key not in self.masks:
            kp = self.key_pos.view(1, 1, -1)
            qp = self.q_pos.unsqueeze(-1)
            m = (kp <= qp) & (kp < self.kv_len.view(-1, 1, 1))
            if sliding_window:
                m = m & (qp - kp < sliding_window)
            self.masks[key] = m.unsqueeze(1).to(device)
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
        max_pages = max(len(bt) for bt in block_tables)
        bt = torch.zeros(len(block_tables), max_pages, dtype=torch.long)
        for i, pages in enumerate(block_tables):
            bt[i, :len(pages)] = torch.tensor(pages, dtype=torch.long)
        self.block_index = bt.to(device)
        self.num_pages = torch.tensor([len(p) for p in block_tables], device=device)
        past = torch.tensor(past_lens, dtype=torch.long, device=device)
        ql = torch.tensor(q_lens, dtype=torch.long, device=device)
        self.cache_seqlens = past

        seq_of_token = torch.repeat_interleave(torch.arange(len(q_lens), device=device), ql)
        starts = torch.cumsum(ql, 0) - ql
        within = torch.arange(total, device=device) - starts[seq_of_token]
        pos = past[seq_of_token] + within
        self.positions = pos.unsqueeze(0)
        self.slots = self._slots(seq_of_token, pos)
        self.last_token_index = starts + ql - 1  # the packed index of each sequence's last new token

        self.groups: list[_Group] = []
        for q in sorted(set(q_lens)):
            rows = (ql == q).nonzero().flatten()
            q_index = starts[rows].unsqueeze(1) + torch.arange(q, device=device).unsqueeze(0)
            kv_len = past[rows] + q
            L = int(kv_len.max())
            key_pos = torch.arange(L, device=device)
            page_idx = (key_pos // page_size).unsqueeze(0).expand(len(rows), -1)
            page_idx = page_idx.clamp(max=max_pages - 1)
            kv_slots = bt.to(device)[rows].gather(1, page_idx) * page_size + key_pos % page_size
            slot_start = None
            if len(rows) == 1:
                pages = block_tables[int(rows[0])][:-(-L // page_size)]
                if pages == list(range(pages[0], pages[0] + len(pages))):
                    slot_start = pages[0] * page_size
            whole = len(set(q_lens)) == 1  # every sequence feeds q tokens: the group is the packed row in order
            self.groups.append(_Group(q_index, kv_slots, key_pos, pos[q_index], kv_len, {}, slot_start, whole))
        self.max_position = max(p + q for p, q in zip(past_lens, q_lens))

    def _slots(self, seq_of_token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        page = self.block_index[seq_of_token, pos // self.page_size]
        return page * self.page_size + pos % self.page_size

    def get_positions(self, device) -> tuple[torch.Tensor, int]:
        return self.positions.to(device), self.max_position

    def get_attn_mask(self, device, sliding_window: int = 0):
        raise RuntimeError("PagedParams: masks are per group; use paged_attention()")


def paged_attention(module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache,
                    params: PagedParams) -> torch.Tensor:
    """q (1, T, hq, d), k and v (1, T, hk, d) after RoPE. Writes k/v into the pages and returns
    (1, T, hq * d)."""
    if q.shape[0] != 1 or q.shape[1] != params.seq_len:
        raise ValueError(f"paged attention expects packed input (1, {params.seq_len}, ...), got {tuple(q.shape)}")
    if cache is None or cache.batch_size != 1:
        raise ValueError("paged attention needs an ExLlamaV2Cache with batch_size=1")
    kc, vc = cache.get_kv_state(module.layer_idx, 1, 0, 0)
    return ops.paged_attention(q, k, v, kc, vc, params, module.sliding_window or 0, module.scaling, module.softcap)
