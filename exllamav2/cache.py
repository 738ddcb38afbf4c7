"""KV caches. Per attention layer one K and one V tensor, preallocated, laid out (batch, max_seq_len, kv_heads,
head_dim) as the original's. `current_seq_len` is the number of positions filled (shared by all rows; uneven
prompts are left padded).

The layout is page-major: a row's positions cut into pages of page_size tokens, (max_seq_len / page_size,
page_size, kv_heads, head_dim), are the pages the dynamic generator addresses through its block tables (a batch-1
cache, paged_attn.py), and the seed API's batch-1 decode reads a plain cache as consecutive pages
(runtime/cuda_graphs.py): one layout for every generator. Attention reads a row's prefix as the strided view
(kv_heads, positions, head_dim), each position's head_dim values contiguous."""

from __future__ import annotations

import os

import torch


def device_memory(device: str) -> int | None:
    """Bytes of memory a device has in all (physical RAM for the CPU), or None if unknown."""
    try:
        dev = torch.device(device)
        if dev.type == "cuda":
            return torch.cuda.get_device_properties(dev).total_memory
        if dev.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, RuntimeError, AttributeError):
        return None
    return None


def check_cache_size(model, batch_size: int, max_seq_len: int, dtype: torch.dtype, kv_heads: int,
                     layer_devices: list[str]) -> None:
    """Refuse, with the setting to change, a K/V cache larger than the memory of the devices that would hold it
    (a context length such as max_position_embeddings=10**12 would otherwise fail deep in an allocation)."""
    cfg = model.config
    per_layer = 2 * batch_size * kv_heads * max_seq_len * cfg.head_dim * torch.empty((), dtype=dtype).element_size()
    need: dict[str, int] = {}
    for dev in layer_devices:
        need[dev] = need.get(dev, 0) + per_layer
    for dev, n in need.items():
        have = device_memory(dev)
        if have is not None and n > have:
            native = getattr(cfg, "native_max_seq_len", None)
            origin = (f"; the model's config sets max_position_embeddings={native} "
                      f"({getattr(cfg, 'config_source', 'config.json')})"
                      if native is not None and getattr(cfg, "max_seq_len", None) == native <= max_seq_len else "")
            raise ValueError(f"a K/V cache of max_seq_len={max_seq_len} positions x {batch_size} rows needs "
                             f"{n / 2**30:.1f} GiB on {dev}, which has {have / 2**30:.1f} GiB{origin}; set a smaller "
                             f"max_seq_len (serve/generate: --max-seq-len, or --cache-tokens)")


class ExLlamaV2CacheBase:
    def __init__(self, model, batch_size: int = 1, max_seq_len: int = -1, copy_from=None, lazy: bool = False,
                 num_key_value_heads: int | None = None, fixed_device=None, dtype: torch.dtype | None = None):
        self.model = model
        cfg = model.config
        self.batch_size = batch_size
        self.max_seq_len = cfg.max_seq_len if max_seq_len == -1 else max_seq_len
        if self.max_seq_len <= 0:
            raise ValueError(f"cache max_seq_len must be positive, got {self.max_seq_len}")
        self.num_key_value_heads = num_key_value_heads or cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.num_hidden_layers = cfg.num_hidden_layers
        self.fixed_device = fixed_device
        self.dtype = dtype or model.dtype
        self.current_seq_len = 0
        self.key_states: list = [None] * self.num_hidden_layers
        self.value_states: list = [None] * self.num_hidden_layers
        self.shape_basic = (batch_size, self.max_seq_len, self.num_key_value_heads, self.head_dim)
        if copy_from is None:
            check_cache_size(model, batch_size, self.max_seq_len, self.dtype, self.num_key_value_heads,
                             [self._layer_device(i) for i in range(self.num_hidden_layers)])
        if not lazy:
            self.create_state_tensors(copy_from)

    def _layer_device(self, idx: int) -> str:
        if self.fixed_device is not None:
            return str(self.fixed_device)
        cm = getattr(self.model, "cache_map", None) or {}
        if idx in cm:
            return cm[idx]
        # before load(): the device the layer's attention module is placed on
        for m in self.model.kv_modules():
            if m.layer_idx == idx:
                return m.device()
        return "cpu"

    def create_state_tensors(self, copy_from=None, lazy: bool = False) -> None:
        for i in range(self.num_hidden_layers):
            dev = self._layer_device(i)
            if copy_from is not None:
                self.key_states[i] = copy_from.key_states[i].clone()
                self.value_states[i] = copy_from.value_states[i].clone()
            else:
                self.key_states[i] = torch.zeros(self.shape_basic, dtype=self.dtype, device=dev)
                self.value_states[i] = torch.zeros(self.shape_basic, dtype=self.dtype, device=dev)
        if copy_from is not None:
            self.current_seq_len = copy_from.current_seq_len

    def update_cache_tensors(self) -> None:
        for i in range(self.num_hidden_layers):
            dev = self._layer_device(i)
            if self.key_states[i] is None:
                self.key_states[i] = torch.zeros(self.shape_basic, dtype=self.dtype, device=dev)
                self.value_states[i] = torch.zeros(self.shape_basic, dtype=self.dtype, device=dev)
            elif str(self.key_states[i].device) != torch.device(dev).__str__():
                self.key_states[i] = self.key_states[i].to(dev)
                self.value_states[i] = self.value_states[i].to(dev)

    def get_kv_state(self, layer_idx: int, batch_size: int, offset: int, width: int, page_size: int = 0,
                     cache_seqlens=None, block_table=None):
        return self.key_states[layer_idx], self.value_states[layer_idx]

    def store_kv_state(self, layer_idx: int, batch_size: int, offset: int, width: int, page_size: int = 0,
                       cache_seqlens=None, block_table=None):
        pass

    def check_room(self, q_len: int, past_len: int | None = None) -> None:
        past = self.current_seq_len if past_len is None else past_len
        if past + q_len > self.max_seq_len:
            raise ValueError(f"input of {q_len} tokens after {past} cached ones needs {past + q_len} positions, "
                             f"but the cache holds max_seq_len={self.max_seq_len}")

    def copy_states(self, target, from_column: int, from_columns: int, to_column: int, to_columns: int,
                    from_row: int, from_rows: int, to_row: int, to_rows: int) -> None:
        """Copy token positions [from_column, +from_columns) of batch rows [from_row, +from_rows) into
        `target` at [to_column, +to_columns) / [to_row, +to_rows)."""
        if from_columns != to_columns or from_rows != to_rows:
            raise ValueError("copy_states: source and target ranges must have the same size")
        for i in range(self.num_hidden_layers):
            for src, dst in ((self.key_states[i], target.key_states[i]), (self.value_states[i], target.value_states[i])):
                dst[to_row:to_row + to_rows, to_column:to_column + to_columns].copy_(
                    src[from_row:from_row + from_rows, from_column:from_column + from_columns])

    def roll_left(self) -> None:
        for i in range(self.num_hidden_layers):
            for t in (self.key_states[i], self.value_states[i]):
                t[:, :-1].copy_(t[:, 1:].clone())
        self.current_seq_len = max(0, self.current_seq_len - 1)

    def reset(self) -> None:
        self.current_seq_len = 0

    def all_tensors(self) -> list:
        return [t for pair in zip(self.key_states, self.value_states) for t in pair if t is not None]

    def footprint(self) -> dict:
        out: dict = {}
        for t in self.all_tensors():
            out[str(t.device)] = out.get(str(t.device), 0) + t.numel() * t.element_size()
        return out

    def touch_device(self, device) -> None:
        pass

    def clone(self):
        return type(self)(self.model, self.batch_size, self.max_seq_len, copy_from=self,
                          num_key_value_heads=self.num_key_value_heads, fixed_device=self.fixed_device, dtype=self.dtype)


class ExLlamaV2Cache(ExLlamaV2CacheBase):
    """KV cache in the model's activation dtype."""


def __getattr__(name: str):  # quantized caches live in cache_q.py (imported lazily: it imports this module)
    if name in ("ExLlamaV2Cache_Q4", "ExLlamaV2Cache_Q6", "ExLlamaV2Cache_Q8", "ExLlamaV2Cache_8bit"):
        from . import cache_q
        return getattr(cache_q, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
