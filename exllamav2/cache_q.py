"""Quantized KV caches: ExLlamaV2Cache_Q4 (K4/V4), _Q6 (K8/V4), _Q8 (K8/V8) and _8bit (FP8 e5m2).

Storage per layer keeps the page-major (batch, max_seq_len, kv_heads, ...) layout of ExLlamaV2Cache (cache.py):
- 4/8-bit: `key_states`/`value_states` are uint8 codes (batch, max_seq_len, kv_heads, head_dim * bits / 8), two
  4-bit codes per byte, low nibble first; `key_scales`/`value_scales` hold one scale per group of 32 values
  (batch, max_seq_len, kv_heads, head_dim / 32) in the activation dtype. Each group of 32 consecutive head_dim values
  is rotated by the unnormalised 32-point Walsh-Hadamard matrix (spreads outliers over the group) before rounding.
- FP8: `key_states`/`value_states` are the e5m2 bytes (as uint8) of every value; no scales.

Two ways in:
- the seed API (model.forward over a cache of any batch size): `get_kv_state(layer, b, offset, width)`
  dequantises positions [0, offset + width) of rows [:b] into a per-device temporary of full cache shape in the
  activation dtype and returns it; attention writes its new tokens into the temporary and reads the prefix;
  `store_kv_state(layer, b, offset, width)` quantises [offset, offset + width) of the temporary back into storage.
  A prompt's new tokens attend each other exactly, as in the original (the paged path below quantises them first:
  there a prompt's chunks depend on what else shares the step, and its tokens must not; quantising a prompt first
  here too cost SmolLM2 two of 16 teacher-forced greedy tokens with the Q4 cache, tests/test_cache_q.py). A decode
  step (one token per row) on the CPU skips the temporary: attn.py writes the token's codes and attends straight
  from the codes (the CPU kernel for quantized pages), the token attending to itself as stored, as on the paged
  path and the compiled decode step.
  The temporaries are shared by all layers of one cache (layers run one after another).
- the dynamic generator (batch_size 1, the sequence axis cut into pages): `paged_layer(layer)` hands the layer's
  codes and scales to the `quant_paged_attention` op (paged_attn.py), which quantises the new tokens into their
  pages and dequantises keys and values inside attention, per sequence (ops/torch_ref/attention_quant.py) or per
  tile in the Triton kernel (ops/triton/attention_quant.py): no full-size temporary.

The formats themselves (GroupQuant, FP8Quant) are in ops/torch_ref/kv_quant.py.
"""

from __future__ import annotations

import torch

from .cache import ExLlamaV2CacheBase
# the formats live beside the attention reference that reads them; imported here as the cache's public names
from .ops.torch_ref.kv_quant import GROUP, FP8Quant, GroupQuant, QuantPages  # noqa: F401


def has_quant_pages(cache) -> bool:
    """Whether `cache` hands its layers to attention as quantized pages (`paged_layer`): a quantized cache, or a
    quantized cache's rows seen as one paged cache (runtime/cuda_graphs.py: FlatQuantCache)."""
    return callable(getattr(cache, "paged_layer", None))


class ExLlamaV2CacheQuantBase(ExLlamaV2CacheBase):
    """Shared machinery of the quantized caches; subclasses set `k_format` and `v_format`."""

    k_format: GroupQuant | FP8Quant
    v_format: GroupQuant | FP8Quant
    supports_paged = True  # the dynamic generator reads it through paged_layer()

    def __init__(self, model, batch_size: int = 1, max_seq_len: int = -1, copy_from=None, lazy: bool = False,
                 num_key_value_heads: int | None = None, fixed_device=None, dtype: torch.dtype | None = None):
        cfg = model.config
        if any(f.has_scales for f in (self.k_format, self.v_format)) and cfg.head_dim % GROUP:
            raise ValueError(f"{type(self).__name__}: the model's head_dim is {cfg.head_dim}, but this cache "
                             f"quantizes groups of {GROUP} values and needs head_dim to be a multiple of {GROUP}")
        self.key_scales: list = [None] * cfg.num_hidden_layers
        self.value_scales: list = [None] * cfg.num_hidden_layers
        self._temp: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        super().__init__(model, batch_size, max_seq_len, copy_from, lazy, num_key_value_heads, fixed_device, dtype)
        if not self.dtype.is_floating_point:
            raise ValueError(f"{type(self).__name__}: activation dtype must be floating point, got {self.dtype}")

    # ------------------------------------------------------------------ storage

    def _state_lists(self) -> list[list]:
        return [self.key_states, self.value_states, self.key_scales, self.value_scales]

    def _alloc_layer(self, i: int) -> None:
        dev = self._layer_device(i)
        b, n, h, d = self.shape_basic
        for fmt, codes, scales in ((self.k_format, self.key_states, self.key_scales),
                                   (self.v_format, self.value_states, self.value_scales)):
            codes[i] = torch.zeros((b, n, h, fmt.code_width(d)), dtype=torch.uint8, device=dev)
            scales[i] = (torch.zeros((b, n, h, fmt.scale_width(d)), dtype=self.dtype, device=dev)
                         if fmt.has_scales else None)

    def create_state_tensors(self, copy_from=None, lazy: bool = False) -> None:
        if copy_from is not None and type(copy_from) is not type(self):
            raise ValueError(f"{type(self).__name__}: cannot copy states from a {type(copy_from).__name__}")
        for i in range(self.num_hidden_layers):
            if copy_from is not None:
                for mine, theirs in zip(self._state_lists(), copy_from._state_lists()):
                    mine[i] = None if theirs[i] is None else theirs[i].clone()
            else:
                self._alloc_layer(i)
        if copy_from is not None:
            self.current_seq_len = copy_from.current_seq_len

    def update_cache_tensors(self) -> None:
        for i in range(self.num_hidden_layers):
            dev = torch.device(self._layer_device(i))
            if self.key_states[i] is None:
                self._alloc_layer(i)
            elif self.key_states[i].device != dev:
                for lst in self._state_lists():
                    if lst[i] is not None:
                        lst[i] = lst[i].to(dev)

    def all_tensors(self) -> list:
        return [lst[i] for i in range(self.num_hidden_layers) for lst in self._state_lists() if lst[i] is not None]

    # ------------------------------------------------------------------ attention interface

    def _temp_for(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._temp:
            self._temp[key] = (torch.empty(self.shape_basic, dtype=self.dtype, device=device),
                               torch.empty(self.shape_basic, dtype=self.dtype, device=device))
        return self._temp[key]

    def _check_unpaged(self, page_size, block_table, width: int) -> None:
        # the plain cache's paged path asks for width 0 and scatters into the returned tensors directly
        if page_size or block_table is not None or width <= 0:
            raise ValueError(f"{type(self).__name__}: get_kv_state/store_kv_state serve the contiguous path; paged "
                             f"attention reads this cache through paged_layer()")

    def paged_layer(self, layer_idx: int) -> QuantPages:
        """Layer `layer_idx` as pages for the paged attention ops: the codes and scales of batch row 0."""
        if self.batch_size != 1:
            raise ValueError(f"{type(self).__name__}: paged attention needs batch_size=1, got {self.batch_size}")
        ks, vs = self.key_scales[layer_idx], self.value_scales[layer_idx]
        return QuantPages(self.key_states[layer_idx][0], None if ks is None else ks[0], self.value_states[layer_idx][0],
                          None if vs is None else vs[0], self.k_format, self.v_format, self.dtype)

    def get_kv_state(self, layer_idx: int, batch_size: int, offset: int, width: int, page_size: int = 0,
                     cache_seqlens=None, block_table=None):
        self._check_unpaged(page_size, block_table, width)
        end = offset + width
        if end > self.max_seq_len:
            raise ValueError(f"{type(self).__name__}: positions up to {end} requested, max_seq_len is {self.max_seq_len}")
        kq, vq = self.key_states[layer_idx], self.value_states[layer_idx]
        tk, tv = self._temp_for(kq.device)
        b = min(batch_size, self.batch_size)
        for fmt, codes, scales, temp in ((self.k_format, kq, self.key_scales[layer_idx], tk),
                                         (self.v_format, vq, self.value_scales[layer_idx], tv)):
            sc = None if scales is None else scales[:b, :end]
            temp[:b, :end] = fmt.dequantize(codes[:b, :end], sc, self.dtype)
        return tk, tv

    def store_kv_state(self, layer_idx: int, batch_size: int, offset: int, width: int, page_size: int = 0,
                       cache_seqlens=None, block_table=None):
        self._check_unpaged(page_size, block_table, width)
        kq = self.key_states[layer_idx]
        tk, tv = self._temp_for(kq.device)
        b, end = min(batch_size, self.batch_size), offset + width
        if self._write_with_kernel(layer_idx, tk, tv, b, offset, end):
            return
        for fmt, codes, scales, temp in ((self.k_format, kq, self.key_scales[layer_idx], tk),
                                         (self.v_format, self.value_states[layer_idx], self.value_scales[layer_idx], tv)):
            q, s = fmt.quantize(temp[:b, offset:end], self.dtype)
            codes[:b, offset:end] = q
            if s is not None:
                scales[:b, offset:end] = s

    def _write_with_kernel(self, layer_idx: int, tk, tv, b: int, offset: int, end: int) -> bool:
        """Positions [offset, end) of rows [:b] of the temporaries quantised into storage by the CPU kernel (one call,
        bit-identical to the formats' quantize: ops/cpu/attention.py quant_write); False where it does not apply."""
        kq = self.key_states[layer_idx]
        if kq.device.type != "cpu" or not kq.is_contiguous() or torch.compiler.is_compiling():
            return False
        from .ops import dispatch
        from .ops.cpu import attention as cpu_attention
        if "cpu" not in dispatch.active_backends():
            return False
        from .runtime.cuda_graphs import flat_view
        n = self.max_seq_len
        pages = (self if self.batch_size == 1 else flat_view(self)).paged_layer(layer_idx)
        rows = torch.arange(b).view(b, 1) * n + torch.arange(offset, end).view(1, -1)
        k = tk[:b, offset:end].reshape(-1, *tk.shape[2:])
        v = tv[:b, offset:end].reshape(-1, *tv.shape[2:])
        return cpu_attention.quant_write(pages, k, v, rows.reshape(-1))

    # ------------------------------------------------------------------ bookkeeping

    def copy_states(self, target, from_column: int, from_columns: int, to_column: int, to_columns: int,
                    from_row: int, from_rows: int, to_row: int, to_rows: int) -> None:
        """Copy token positions [from_column, +from_columns) of batch rows [from_row, +from_rows) into `target`
        (a cache of the same class) at [to_column, +to_columns) / [to_row, +to_rows), codes and scales alike."""
        if type(target) is not type(self):
            raise ValueError(f"copy_states: target must be a {type(self).__name__}, got {type(target).__name__}")
        if from_columns != to_columns or from_rows != to_rows:
            raise ValueError("copy_states: source and target ranges must have the same size")
        for i in range(self.num_hidden_layers):
            for src, dst in zip(self._state_lists(), target._state_lists()):
                if src[i] is not None:
                    dst[i][to_row:to_row + to_rows, to_column:to_column + to_columns].copy_(
                        src[i][from_row:from_row + from_rows, from_column:from_column + from_columns])

    def roll_left(self) -> None:
        for t in self.all_tensors():
            t[:, :-1].copy_(t[:, 1:].clone())
        self.current_seq_len = max(0, self.current_seq_len - 1)


class ExLlamaV2Cache_Q4(ExLlamaV2CacheQuantBase):
    """4-bit keys and values (groups of 32, Hadamard-rotated): about 0.28 of an fp16 cache."""
    k_format = GroupQuant(4)
    v_format = GroupQuant(4)


class ExLlamaV2Cache_Q6(ExLlamaV2CacheQuantBase):
    """8-bit keys, 4-bit values (as the original's Q6): about 0.41 of an fp16 cache."""
    k_format = GroupQuant(8)
    v_format = GroupQuant(4)


class ExLlamaV2Cache_Q8(ExLlamaV2CacheQuantBase):
    """8-bit keys and values (groups of 32, Hadamard-rotated): about 0.53 of an fp16 cache."""
    k_format = GroupQuant(8)
    v_format = GroupQuant(8)


class ExLlamaV2Cache_8bit(ExLlamaV2CacheQuantBase):
    """FP8 e5m2 keys and values: half of an fp16 cache."""
    k_format = FP8Quant()
    v_format = FP8Quant()
