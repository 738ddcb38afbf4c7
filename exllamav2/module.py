"""The module contract (seed 000): ExLlamaV2Module, the base of every model part, and Intervention."""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn


class MissingTensorError(KeyError):
    def __str__(self):
        return str(self.args[0]) if self.args else ""


class TensorShapeError(ValueError):
    pass


_EXL2_KEYS = ["q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups", "q_perm", "bias"]
_GPTQ_KEYS = ["qweight", "qzeros", "scales", "g_idx", "bias"]


class ExLlamaV2Module:
    """Base class for every model part. `key` names the module's place in the weight namespace
    (e.g. "model.layers.0.self_attn.q_proj"); a trailing dot is accepted and dropped."""

    name: str = "Module"
    # True where a position's output depends on that position's input alone (no attention across positions):
    # model.forward_chunk then runs the modules after the last KV layer on the rows it returns only
    per_position: bool = False

    def __init__(self, model, key: str, archparams=None):
        self.model = model
        self.config = model.config
        self.key = key.rstrip(".") if key else key
        self.alt_key = None
        self.archparams = archparams if archparams is not None else model.config.arch.lm
        self.device_idx = getattr(model, "default_device_idx", -1)
        self.footprint = -1
        self.submodules = []
        self.assumed_footprint = 0

    # ------------------------------------------------------------------ abstract interface

    # a module made of submodules (attention, MLP, ...) loads, unloads and counts through them by default

    def numel(self) -> int:
        if not self.submodules:
            raise NotImplementedError
        return sum(m.numel() for m in self.submodules)

    def load(self, device_context: bool = True):
        if not self.submodules:
            raise NotImplementedError
        for m in self.submodules:
            m.load()

    def unload(self):
        if not self.submodules:
            raise NotImplementedError
        for m in self.submodules:
            m.unload()

    def scratch_space_fixed(self) -> int:
        return 0

    def scratch_space_tp(self) -> int:
        return 0

    def scratch_space(self) -> int:
        return 0

    def forward(self, hidden_states, cache=None, attn_params=None, past_len=None,
                intermediates=None, loras=None, **kwargs):
        raise NotImplementedError

    # ------------------------------------------------------------------ concrete helpers

    def add_residual(self, residual: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The block's output: `y` alone without a residual (parallel-decoder branches), else residual + y, kept in
        fp32 for architectures whose residual stream is fp32 (Gemma 2/3)."""
        if not getattr(self, "has_residual", True):
            return y
        if self.archparams.residual_stream_fp32:
            return residual.float() + y.float()
        return residual + (y if y.dtype == residual.dtype else y.to(residual.dtype))

    def device(self) -> str:
        idx = self.device_idx
        return "cpu" if idx is None or (isinstance(idx, int) and idx < 0) else f"cuda:{idx}"

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def _source(self, name: str):
        return self.config.tensor_file_map.get(name)

    def has_tensor(self, name: str) -> bool:
        return name in self.config.tensor_file_map

    def load_multi(self, key, keys, measure=False, cpu=False):
        """Load `key.<suffix>` for each suffix present, grouped by source file. With `measure`, return the
        sum of their stored sizes in bytes (from file headers; no tensor data is read)."""
        by_file: dict = {}
        for suffix in keys:
            name = f"{key}.{suffix}"
            src = self._source(name)
            if src is not None:
                by_file.setdefault(id(src), (src, []))[1].append((suffix, name))
        if measure:
            return sum(src.nbytes(name) for src, items in by_file.values() for _, name in items)
        device = "cpu" if cpu else self.device()
        out = {}
        for src, items in by_file.values():
            for suffix, name in items:
                out[suffix] = src.get_tensor(name, device=device)
        return out

    def _float(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.dtype) if t.is_floating_point() else t

    def load_weight(self, override_key=None, cpu=False):
        """EXL2 dict if `<key>.q_weight` exists, GPTQ dict if `<key>.qweight`, else `Parameter(weight)` or
        `(Parameter(weight), Parameter(bias))`; None when no candidate key has tensors."""
        keys = [override_key] if override_key is not None else [self.key, self.alt_key]
        for key in keys:
            if key is None:
                continue
            if self.has_tensor(key + ".q_weight"):
                t = self.load_multi(key, _EXL2_KEYS, cpu=cpu)
                if "q_invperm" in t:
                    t["q_perm"] = torch.argsort(t["q_invperm"].long()).to(torch.int32)
                if "bias" in t:
                    t["bias"] = self._float(t["bias"])
                return t
            if self.has_tensor(key + ".qweight"):
                t = self.load_multi(key, _GPTQ_KEYS, cpu=cpu)
                if "bias" in t:
                    if not torch.any(t["bias"] != 0):
                        del t["bias"]
                    else:
                        t["bias"] = self._float(t["bias"])
                return t
            if self.has_tensor(key + ".weight"):
                t = self.load_multi(key, ["weight", "bias"], cpu=cpu)
                w = self._float(t["weight"])
                if self.stored_transposed() and w.dim() == 2:
                    w = w.T.contiguous()
                w = nn.Parameter(w, requires_grad=False)
                if "bias" in t:
                    return w, nn.Parameter(self._float(t["bias"]), requires_grad=False)
                return w
        return None

    def stored_transposed(self) -> bool:
        """True when this module's 2-D weights are stored (in, out): `orig_weights_transposed` (GPT-2's Conv1D)
        covers the linears inside decoder layers; embeddings and the head are stored (rows, hidden) anyway."""
        return self.archparams.orig_weights_transposed and getattr(self, "is_sub_module", False)

    def load_weight_fused(self, f_key, f_beg, f_end, in_feat, out_feat, altpack_qkv):
        """Rows [f_beg, f_end) of a fused tensor (and its bias), read without loading the other rows.
        Handles a source stored transposed ((in, rows) instead of (rows, in)) and the altpack QKV layout
        (per-KV-head [q_0..q_{g-1}, k, v] blocks of head_dim rows; with one q head per KV head this is
        GPT-NeoX's per-head [q, k, v] interleave). With altpack, [f_beg, f_end) counts in the unpacked q|k|v
        order and the stored rows are picked by a strided selection."""
        w_name = f_key + ".weight" if self.has_tensor(f_key + ".weight") else (f_key if self.has_tensor(f_key) else None)
        if w_name is None:
            return None
        b_name = f_key + ".bias" if self.has_tensor(f_key + ".bias") else None
        src = self._source(w_name)
        shape = tuple(src.shape(w_name))
        transposed = len(shape) == 2 and (self.stored_transposed() or (shape[1] != in_feat and shape[0] == in_feat))
        rows = shape[1] if transposed else shape[0]
        cols = shape[0] if transposed else shape[1] if len(shape) == 2 else None
        expect = getattr(self, "fused_rows", None)
        how = " (stored transposed)" if transposed else ""
        if cols != in_feat or f_end > rows or f_beg < 0 or f_beg >= f_end:
            raise TensorShapeError(
                f"{w_name}: fused tensor has shape {list(shape)}; expected {expect or f'>= {f_end}'} rows "
                f"of {in_feat} input features{how} to take rows [{f_beg}, {f_end})")
        if expect is not None and rows != expect:
            raise TensorShapeError(f"{w_name}: fused tensor has {rows} rows{how}, expected {expect} rows "
                                   f"of {in_feat} input features ({list(shape)})")
        index = fused_row_index(rows, f_beg, f_end, self.config if altpack_qkv else None, w_name)
        device = self.device()

        def take(name, is_bias):
            s = self._source(name)
            n = s.shape(name)[0]
            if is_bias and n != rows:
                raise TensorShapeError(f"{name}: fused bias has {n} entries, expected {rows}")
            t = read_rows(s, name, index, transposed and not is_bias)
            return self._float(t.contiguous()).to(device)

        w = nn.Parameter(take(w_name, False), requires_grad=False)
        if w.shape != (f_end - f_beg, in_feat):
            raise TensorShapeError(f"{w_name}: slice [{f_beg}, {f_end}) has shape {list(w.shape)}, expected {[f_end - f_beg, in_feat]}")
        if b_name is not None:
            return w, nn.Parameter(take(b_name, True), requires_grad=False)
        return w

    def weight_footprint(self) -> int:
        """Bytes of this module's weights as stored on disk (cached); `assumed_footprint` when none found."""
        if self.footprint >= 0:
            return self.footprint
        if self.submodules:
            fp = sum(m.weight_footprint() for m in self.submodules)
        else:
            fp = 0
            for key in (self.key, self.alt_key):
                if key is None:
                    continue
                for keys in (_EXL2_KEYS, _GPTQ_KEYS, ["weight", "bias"]):
                    fp = self.load_multi(key, keys, measure=True)
                    if fp:
                        break
                if fp:
                    break
            if not fp:
                fp = self.fused_footprint()
            if not fp:
                fp = self.assumed_footprint
        self.footprint = fp
        return fp

    def fused_footprint(self) -> int:
        return 0

    def set_device_idx(self, idx: int | None):
        self.device_idx = -1 if idx is None else idx
        for m in self.submodules:
            m.set_device_idx(idx)

    def is_quant(self) -> bool:
        return False

    def reload(self):
        self.unload()
        self.load()

    def __repr__(self):
        return f"{type(self).__name__}({self.key!r})"


def fused_row_index(rows: int, f_beg: int, f_end: int, altpack_config=None, name: str = "fused tensor") -> torch.Tensor:
    """Stored row numbers of rows [f_beg, f_end) of a fused tensor. Without `altpack_config` that is the plain
    range; with it (a config giving num_attention_heads, num_key_value_heads, head_dim) the stored rows are
    per-KV-head blocks [q_0..q_{g-1}, k, v] and [f_beg, f_end) counts in the unpacked q|k|v order."""
    index = torch.arange(rows)
    if altpack_config is not None:
        hkv, d = altpack_config.num_key_value_heads, altpack_config.head_dim
        g = altpack_config.num_attention_heads // hkv
        if rows != hkv * (g + 2) * d:
            raise TensorShapeError(f"{name}: altpack QKV tensor has {rows} rows, expected {hkv * (g + 2) * d} "
                                   f"({hkv} KV heads x ({g} q + k + v) x head_dim {d})")
        blocks = index.view(hkv, g + 2, d)
        index = torch.cat((blocks[:, :g].reshape(-1), blocks[:, g].reshape(-1), blocks[:, g + 1].reshape(-1)))
    return index[f_beg:f_end]


def row_runs(index: torch.Tensor) -> list[tuple[int, int]]:
    """Split sorted-within-runs row numbers into maximal [beg, end) runs of consecutive rows."""
    if index.numel() == 0:
        return []
    breaks = (torch.nonzero(index[1:] != index[:-1] + 1).flatten() + 1).tolist()
    starts, ends = [0] + breaks, breaks + [index.numel()]
    return [(int(index[a]), int(index[b - 1]) + 1) for a, b in zip(starts, ends)]


def read_rows(src, name: str, index: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Rows `index` of tensor `name` as (len(index), ...). A transposed source (in, rows) is read by columns.
    Sources with `get_slice` (safetensors) read only the selected runs; others load the tensor once."""
    dim = 1 if transposed else 0
    if hasattr(src, "get_slice"):
        parts = [src.get_slice(name, dim, b, e) for b, e in row_runs(index)]
        t = parts[0] if len(parts) == 1 else torch.cat(parts, dim)
    else:
        t = src.get_tensor(name).index_select(dim, index)
    return t.T if transposed else t


_OWN = ("inner", "pre_forward", "post_forward")
# every Intervention alive; while it is empty no model can hold one (the compiled decode step checks it first)
_LIVE_INTERVENTIONS: "weakref.WeakSet" = weakref.WeakSet()


def interventions_alive() -> bool:
    return len(_LIVE_INTERVENTIONS) > 0


class Intervention(ExLlamaV2Module):
    """Wraps a module and calls `pre_forward(hidden_states, *args, **kwargs)` before and
    `post_forward(hidden_states, *args, **kwargs)` after its forward. Each hook returns the (possibly
    modified) hidden states, which are moved back to the device they were on. Everything else, attribute
    reads and writes included, is delegated to the inner module, so a wrapped module keeps its
    `layer_idx`, device placement and weights."""

    def __init__(self, inner: ExLlamaV2Module, pre_forward=None, post_forward=None):
        _LIVE_INTERVENTIONS.add(self)
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "pre_forward", pre_forward)
        object.__setattr__(self, "post_forward", post_forward)

    def __getattr__(self, name):
        if name in _OWN:
            raise AttributeError(name)
        return getattr(object.__getattribute__(self, "inner"), name)

    def __setattr__(self, name, value):
        if name in _OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.inner, name, value)

    def forward(self, hidden_states, *args, **kwargs):
        if self.pre_forward is not None:
            dev = hidden_states.device
            hidden_states = self.pre_forward(hidden_states, *args, **kwargs).to(dev)
        out = self.inner.forward(hidden_states, *args, **kwargs)
        if self.post_forward is not None:
            if isinstance(out, dict):
                h = out["hidden_states"]
                out["hidden_states"] = self.post_forward(h, *args, **kwargs).to(h.device)
            else:
                dev = out.device
                out = self.post_forward(out, *args, **kwargs).to(dev)
        return out

    # explicit delegation of the base-class methods (attribute lookup would find the base versions first)
    def numel(self): return self.inner.numel()
    def load(self, *args, **kwargs): return self.inner.load(*args, **kwargs)
    def unload(self): return self.inner.unload()
    def scratch_space_fixed(self): return self.inner.scratch_space_fixed()
    def scratch_space_tp(self): return self.inner.scratch_space_tp()
    def scratch_space(self): return self.inner.scratch_space()
    def device(self): return self.inner.device()
    def load_multi(self, *args, **kwargs): return self.inner.load_multi(*args, **kwargs)
    def load_weight(self, *args, **kwargs): return self.inner.load_weight(*args, **kwargs)
    def load_weight_fused(self, *args, **kwargs): return self.inner.load_weight_fused(*args, **kwargs)
    def weight_footprint(self): return self.inner.weight_footprint()
    def set_device_idx(self, idx): return self.inner.set_device_idx(idx)
    def is_quant(self): return self.inner.is_quant()
    def reload(self): return self.inner.reload()
    def has_tensor(self, name): return self.inner.has_tensor(name)
    def fused_footprint(self): return self.inner.fused_footprint()

    @property
    def dtype(self):
        return self.inner.dtype

    @property
    def name(self):
        return self.inner.name

    def __repr__(self):
        return f"Intervention({self.inner!r})"
