"""Launch metadata of the Triton attention kernels (attn_kernels.py): which sequences split their keys, the work
tiles of each launch, and where split partials go.

A sequence is "decode-like" when it feeds at most DECODE_MAX_Q new tokens: its keys are split across programs
and merged by the combine kernel. Longer (prefill) sequences run as whole-sequence flash attention with larger
tiles. The choice and the tiling depend only on the sequence itself, never on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DECODE_MAX_Q = 16  # sequences with at most this many new tokens split their keys (decode, speculative decode)
MIN_SPLIT = 256    # keys per split at least ...
MAX_SPLITS = 32    # ... and at most this many (a power of two) per sequence: longer contexts get larger splits


@dataclass
class TileConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def tile_config(head_dim: int, split: bool, elem_bytes: int = 2) -> TileConfig:
    """Tile sizes for a head dim (padded to a power of two), sequence class and element size (2: fp16/bf16,
    4: fp32); shared memory stays under the 99 KB a block may use on sm_86/sm_89 (checked by
    tests/test_triton_attention_aot.py)."""
    d = block_d(head_dim)
    if elem_bytes > 2:
        if split:
            return TileConfig(16, 64 if d <= 128 else 32, 4, 2)
        if d <= 64:
            return TileConfig(64, 64, 4, 2)
        return TileConfig(64, 32, 4, 2) if d <= 128 else TileConfig(32, 32, 4, 1)
    if split:
        return TileConfig(16, 64, 4, 2)
    if d <= 128:
        return TileConfig(64, 64, 4, 2)
    return TileConfig(64, 32, 4, 2)


def block_d(head_dim: int) -> int:
    return max(16, 1 << (head_dim - 1).bit_length())


def split_grid(max_kv_len: int) -> int:
    """Programs on the split axis: enough for the longest sequence the cache can hold (a shape, not data)."""
    return max(1, min(MAX_SPLITS, -(-max_kv_len // MIN_SPLIT)))


@dataclass
class Launch:
    """One class of sequences (split or whole): its tiles and, for split ones, the partial rows."""
    split: bool
    cfg: TileConfig
    tile_seq: torch.Tensor
    tile_m: torch.Tensor
    num_rows: int = 0            # split partial rows (one per new token of a split sequence)
    part_seq: torch.Tensor | None = None
    part_tok: torch.Tensor | None = None


@dataclass
class AttnMeta:
    q_starts: torch.Tensor       # (S,) int32: each sequence's first row in q/out (0 for contiguous batches)
    q_lens: torch.Tensor         # (S,) int32
    kv_lens: torch.Tensor        # (S,) int32 or int64, only ever read on the device
    part_base: torch.Tensor      # (S,) int32: first partial row of a split sequence (-1 otherwise)
    launches: list[Launch]


def _i32(x, device) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.int32, device=device)


def build(q_lens: list[int], kv_lens: torch.Tensor, group: int, head_dim: int, device, packed: bool = True,
          elem_bytes: int = 2) -> AttnMeta:
    """Metadata for sequences with these new-token counts (host ints: shapes, not data) and kv_lens (a device
    tensor, never read on the host). `packed`: the sequences' rows follow each other in one packed q (paged);
    else each sequence is a batch row starting at row 0 (contiguous)."""
    starts, part_base, launches = [], [], []
    row = prow = 0
    tiles = {True: ([], []), False: ([], [])}
    parts_seq, parts_tok = [], []
    for i, ql in enumerate(q_lens):
        split = ql <= DECODE_MAX_Q
        starts.append(row if packed else 0)
        row += ql
        cfg = tile_config(head_dim, split, elem_bytes)
        for m in range(-(-ql * group // cfg.block_m)):
            tiles[split][0].append(i)
            tiles[split][1].append(m)
        if split:
            part_base.append(prow)
            parts_seq += [i] * ql
            parts_tok += list(range(ql))
            prow += ql
        else:
            part_base.append(-1)
    for split in (True, False):
        ts, tm = tiles[split]
        if not ts:
            continue
        ln = Launch(split, tile_config(head_dim, split, elem_bytes), _i32(ts, device), _i32(tm, device))
        if split:
            ln.num_rows, ln.part_seq, ln.part_tok = prow, _i32(parts_seq, device), _i32(parts_tok, device)
        launches.append(ln)
    return AttnMeta(_i32(starts, device), _i32(q_lens, device), kv_lens.to(device=device, dtype=torch.int32),
                    _i32(part_base, device), launches)


def build_decode(num_seqs: int, kv_lens: torch.Tensor, group: int, head_dim: int, device,
                 elem_bytes: int = 2) -> AttnMeta:
    """Decode-only metadata (one token per sequence), built on the device from shapes alone: no host sync."""
    cfg = tile_config(head_dim, True, elem_bytes)
    m_tiles = -(-group // cfg.block_m)
    seqs = torch.arange(num_seqs, dtype=torch.int32, device=device)
    ln = Launch(True, cfg, seqs.repeat_interleave(m_tiles), torch.arange(m_tiles, dtype=torch.int32,
                                                                         device=device).repeat(num_seqs))
    ln.num_rows, ln.part_seq, ln.part_tok = num_seqs, seqs, torch.zeros_like(seqs)
    ones = torch.ones(num_seqs, dtype=torch.int32, device=device)
    return AttnMeta(seqs, ones, kv_lens, seqs, [ln])
