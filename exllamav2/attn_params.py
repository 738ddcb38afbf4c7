"""Per-forward attention parameters: past length, padding mask, position offsets, and the masks derived
from them (built once per forward and shared by every layer)."""

from __future__ import annotations

import torch


def _keep_mask(input_mask: torch.Tensor, batch_size: int, total: int) -> torch.Tensor:
    """Bool keep-mask (batch, total). A mask narrower than `total` covers the first positions and the rest are
    kept (as the original treats a prompt-width mask during decoding); a wider one is cut."""
    if input_mask.dim() != 2 or input_mask.shape[0] != batch_size:
        raise ValueError(f"model.forward(input_mask=...): shape {list(input_mask.shape)}, expected "
                         f"[{batch_size}, past_len + seq_len = {total}]")
    if input_mask.dtype == torch.bool:
        m = input_mask
    elif input_mask.is_floating_point():
        if bool((input_mask > 0).any()):
            raise ValueError("model.forward(input_mask=...): a float mask is additive (0 = keep, large negative = "
                             "padding) and must not hold positive values; pass a bool mask (True = keep) for 0/1 masks")
        m = input_mask > -1.0
    else:
        raise ValueError(f"model.forward(input_mask=...): dtype {input_mask.dtype} is ambiguous; pass a bool mask "
                         "(True = keep, e.g. mask.bool()) or an additive float mask (tokenizer.padding_mask)")
    m = m[:, :total]
    if m.shape[1] < total:
        m = torch.cat((m, torch.ones(batch_size, total - m.shape[1], dtype=torch.bool, device=m.device)), 1)
    return m


class Params:
    """`input_mask` covers every key position of this forward, shape (batch, past_len + seq_len): either a bool
    keep-mask (True = real token) or an additive float mask (0 = keep, large negative = padding).
    `position_offsets` (batch, 1) is added to each row's positions (negative for left padding)."""

    def __init__(self, batch_size: int = 1, seq_len: int | None = None, past_len: int | None = None,
                 input_mask: torch.Tensor | None = None, position_offsets: torch.Tensor | None = None,
                 paged: bool = False, alt_rope_embed=None, non_causal_attn: bool = False, rope_offsets=None):
        self.batch_size = batch_size
        self.seq_len = seq_len or 0
        self.past_len = past_len or 0
        self.paged = paged
        self.non_causal_attn = non_causal_attn
        self.position_offsets = position_offsets
        self.input_mask = input_mask
        self.alt_rope_embed = alt_rope_embed
        self.rope_offsets = rope_offsets
        # positions of the same input beyond this chunk (model.forward's chunked prefill): length-dependent RoPE
        # (longrope, dynamic NTK) takes its frequencies from the whole input's length, as one pass would
        self.rope_ahead = 0
        self._keep = None
        if input_mask is not None:
            self._keep = _keep_mask(input_mask, batch_size, self.past_len + self.seq_len)
        self._cache: dict = {}

    def is_causal(self) -> bool:
        return self._keep is None and not self.non_causal_attn

    def get_positions(self, device) -> torch.Tensor:
        """(batch, seq_len) long positions: past_len + i (+ offset), clamped at 0."""
        key = ("pos", str(device))
        if key not in self._cache:
            pos = torch.arange(self.past_len, self.past_len + self.seq_len, device=device).unsqueeze(0)
            pos = pos.expand(self.batch_size, -1)
            total = self.past_len + self.seq_len  # every position is below it (no host sync to find the max)
            if self.position_offsets is not None:
                off = self.position_offsets.to(device).view(-1, 1)
                pos = (pos + off).clamp(min=0)
                total = int(pos.max().item()) + 1 if pos.numel() else 1
            self._cache[key] = (pos, max(total, 1))
        return self._cache[key]

    def get_rope(self, rope, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary tables of `rope` gathered at this forward's positions, (b, s, 1, rot): built once per
        forward and shared by every layer that uses the same rotary embedding."""
        key = ("rope", id(rope), str(device), dtype)
        hit = self._cache.get(key)
        if hit is None:
            pos, total = self.get_positions(device)
            hit = self._cache[key] = rope.gathered(pos, total + self.rope_ahead, device, dtype)
        return hit

    def get_write_index(self, device) -> torch.Tensor:
        """(seq_len,) cache positions this forward writes: past_len .. past_len + seq_len - 1."""
        key = ("write", str(device))
        if key not in self._cache:
            self._cache[key] = torch.arange(self.past_len, self.past_len + self.seq_len, device=device)
        return self._cache[key]

    def get_attn_mask(self, device, sliding_window: int = 0) -> torch.Tensor | None:
        """Bool mask (batch, 1, seq_len, past_len + seq_len), True = attend, or None when plain causal
        attention over everything (the caller then uses is_causal for prompts, nothing for one token)."""
        s, total = self.seq_len, self.past_len + self.seq_len
        needs_window = bool(sliding_window) and total > sliding_window
        if self._keep is None and not needs_window and not self.non_causal_attn:
            return None
        key = ("mask", str(device), sliding_window if needs_window else 0)
        if key not in self._cache:
            qpos = torch.arange(self.past_len, total, device=device).view(-1, 1)
            kpos = torch.arange(total, device=device).view(1, -1)
            m = torch.ones(s, total, dtype=torch.bool, device=device) if self.non_causal_attn else (kpos <= qpos)
            if needs_window:
                m = m & (qpos - kpos < sliding_window)
            m = m.unsqueeze(0).expand(self.batch_size, -1, -1)
            if self._keep is not None:
                m = m & self._keep.to(device).unsqueeze(1)
                # a padding query row would see nothing: let it see itself so softmax stays finite
                m = m | (kpos == qpos).unsqueeze(0)
            self._cache[key] = m.unsqueeze(1)
        return self._cache[key]


from .paged_attn import PagedParams  # noqa: E402,F401  (re-export; paged_attn subclasses Params)
