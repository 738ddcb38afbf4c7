"""ExLlamaV2Attention: norm -> q/k/v projections -> q/k norm -> RoPE -> KV cache -> attention -> o_proj
[-> post norm] -> + residual. MHA, GQA and MQA; biases; sliding window; logit softcap; a causal mask in every
path (including left padding through Params.input_mask)."""

from __future__ import annotations

import torch

from . import eager_decode, ops
from .architecture import RopeStyle
from .attn_params import Params
from .cache_q import ExLlamaV2CacheQuantBase, has_quant_pages
from .fused_linear import FusedLinear
from .headnorm import ExLlamaV2HeadNorm
from .linear import ExLlamaV2Linear
from .module import ExLlamaV2Module
from .norms import make_norm
from .ops import dispatch
from .ops.cpu import attention as cpu_attention


class ExLlamaV2Attention(ExLlamaV2Module):
    name = "Attention"
    Params = Params
    kv_layer = True  # owns a layer of the KV cache

    def __init__(self, model, key, layer_idx: int, has_norm: bool = True, has_residual: bool = True,
                 sliding_window: int = 0, archparams=None, rope_index: int = 0):
        super().__init__(model, key, archparams)
        cfg, ap = self.config, self.archparams
        keys = ap.keys
        self.layer_idx = layer_idx
        self.has_norm = has_norm
        self.has_residual = has_residual
        self.sliding_window = sliding_window
        self.rope_index = rope_index
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scaling = cfg.attn_scale()
        self.softcap = cfg.attn_logit_softcapping or 0.0
        hidden, H, Hkv, d = cfg.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim

        self.pre_layernorm = make_norm(model, key + keys["norm_1"], ap) if (has_norm and keys["norm_1"]) else None
        self.post_layernorm = make_norm(model, key + keys["norm_1_post"], ap) if keys["norm_1_post"] else None

        qkv_bias, o_bias = ap.attention_bias_qkv, ap.attention_bias_o
        if keys["fused_qkv"]:
            fk = key + keys["fused_qkv"]
            total = (H + 2 * Hkv) * d
            mk = lambda name, beg, end: ExLlamaV2Linear(model, key + name, hidden, end - beg, qkv_bias, f_key=fk,
                                                         f_beg=beg, f_end=end, altpack_qkv=ap.fused_qkv_altpack,
                                                         archparams=ap, fused_rows=total)
            self.q_proj = mk(keys["attn_q"], 0, H * d)
            self.k_proj = mk(keys["attn_k"], H * d, (H + Hkv) * d)
            self.v_proj = mk(keys["attn_v"], (H + Hkv) * d, total)
        else:
            self.q_proj = ExLlamaV2Linear(model, key + keys["attn_q"], hidden, H * d, qkv_bias, archparams=ap)
            self.k_proj = ExLlamaV2Linear(model, key + keys["attn_k"], hidden, Hkv * d, qkv_bias, archparams=ap)
            self.v_proj = ExLlamaV2Linear(model, key + keys["attn_v"], hidden, Hkv * d, qkv_bias, archparams=ap)
        self.o_proj = ExLlamaV2Linear(model, key + keys["attn_o"], H * d, hidden, o_bias, archparams=ap,
                                      prescale=cfg.scale_depth)

        self.q_norm = self.k_norm = None
        if cfg.use_qk_norm:
            if ap.qk_norm_before_reshape:
                self.q_norm = make_norm(model, key + keys["attn_q_norm"], ap, size=H * d)
                self.k_norm = make_norm(model, key + keys["attn_k_norm"], ap, size=Hkv * d)
            else:
                self.q_norm = ExLlamaV2HeadNorm(model, key + keys["attn_q_norm"], H, d, ap)
                self.k_norm = ExLlamaV2HeadNorm(model, key + keys["attn_k_norm"], Hkv, d, ap)

        self.submodules = [m for m in (self.pre_layernorm, self.q_proj, self.k_proj, self.v_proj, self.o_proj,
                                       self.q_norm, self.k_norm, self.post_layernorm) if m is not None]
        # q, k and v run as one matmul (fused_linear.py), also where the checkpoint stores them apart
        self.qkv = FusedLinear([self.q_proj, self.k_proj, self.v_proj], self, ("q_proj", "k_proj", "v_proj"))

    def load(self, device_context: bool = True):
        super().load(device_context)
        self.qkv.prepare(self.dtype)

    # ------------------------------------------------------------------ module interface

    def hook_sites(self) -> dict:
        """Where the intervention points of this branch are (see interventions/points.py)."""
        h = self.config.hidden_size
        return {
            "attn.post_norm": ("pre_layernorm", "post", h) if self.pre_layernorm is not None else ("", "pre", h),
            "attn.attn_output": ("o_proj", "pre", self.num_heads * self.head_dim),
            "attn_out": ("post_layernorm" if self.post_layernorm is not None else "o_proj", "post", h),
        }

    def is_quant(self) -> bool:
        return self.q_proj.is_quant()

    def update_loras(self):
        pass

    def rope(self):
        return self.model.rotary_for_layer(self.layer_idx, self.rope_index)

    def uses_rope(self) -> bool:
        ap = self.archparams
        if ap.rope_style == RopeStyle.NONE:
            return False
        return not (ap.nope_full_attention and self.config.layer_types[self.layer_idx] == "full_attention")

    def scratch_space_fixed(self) -> int:
        cfg = self.config
        rows = cfg.max_input_len * cfg.max_batch_size
        return rows * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim * 2 * 2

    def scratch_space(self) -> int:
        return self.scratch_space_fixed() + self.temp_attn_size()

    def temp_attn_size(self) -> int:
        cfg = self.config
        return 2 * min(cfg.max_attention_size, cfg.max_seq_len ** 2) * self.num_heads * 2

    # ------------------------------------------------------------------ forward

    def forward(self, hidden_states, cache=None, attn_params=None, past_len=None, intermediates=False,
                loras=None, out_rows: str | torch.Tensor | None = None, **kwargs):
        """`out_rows` (model.last_rows_layer: the last KV layer of a call that wants some positions' logits only):
        after writing every position's k/v, "last" returns the last position only, (b, 1, hidden), a tensor of
        positions returns those, (b, len, hidden), and "none" returns None."""
        if not intermediates and out_rows is None:
            out = eager_decode.attention(self, hidden_states, cache, attn_params, loras, kwargs)
            if out is not None:
                return out
        b, s = hidden_states.shape[0], hidden_states.shape[1]
        if attn_params is None:
            past = past_len if past_len is not None else (cache.current_seq_len if cache is not None else 0)
            attn_params = Params(b, s, past)
        residual = hidden_states
        x = self.pre_layernorm.forward(hidden_states) if self.pre_layernorm is not None else hidden_states
        post_norm = x
        attn_output = self.attend(x, cache, attn_params, loras)
        if isinstance(out_rows, str) and out_rows == "none":
            return None
        if isinstance(out_rows, torch.Tensor):
            attn_output, residual = attn_output[:, out_rows], residual[:, out_rows]
        elif out_rows == "last":
            attn_output, residual = attn_output[:, -1:], residual[:, -1:]
        o = self.o_proj.forward(attn_output, loras=loras)
        if self.post_layernorm is not None:
            o = self.post_layernorm.forward(o)
        out = self.add_residual(residual, o)
        if intermediates:
            return {"post_norm": post_norm, "attn_output": attn_output, "hidden_states": out}
        return out

    def project_qkv(self, x, loras=None):
        b, s = x.shape[0], x.shape[1]
        q, k, v = self.qkv.forward(x, loras)
        if self.q_norm is not None and self.archparams.qk_norm_before_reshape:
            q, k = self.q_norm.forward(q), self.k_norm.forward(k)
        q = q.reshape(b, s, self.num_heads, self.head_dim)
        k = k.reshape(b, s, self.num_kv_heads, self.head_dim)
        v = v.reshape(b, s, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and not self.archparams.qk_norm_before_reshape:
            q, k = self.q_norm.forward(q), self.k_norm.forward(k)
        return q, k, v

    def cache_views(self, cache, b: int, total: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's plain-cache k and v for the first b rows, (b, max_seq_len, kv_heads, d)."""
        kc, vc = cache.get_kv_state(self.layer_idx, b, 0, total)
        if kc.shape[0] < b:
            raise ValueError(f"batch of {b} rows does not fit a cache built for batch_size={kc.shape[0]}")
        return (kc[:b], vc[:b]) if kc.shape[0] != b else (kc, vc)

    def _kv_write_target(self, params, cache, b: int, s: int, qk, v):
        """Where `attend` writes k/v together with RoPE (ops.rope_kv_write): (k cache, v cache, write index), or None
        to leave the write to the attention op. A plain cache: its rows at the new positions. A packed paged step
        over a plain cache whose attention runs on the `cpu` or `torch` backend: the page-major cache (1, slots,
        kv_heads, d) at the tokens' slots, and ops.paged_attention is then told so (k = v = None). Not where the
        triton backend takes a paged step (its kernels write k/v themselves), nor for the compiled decode-only step
        (paged_attn.PagedDecodeParams), which keeps the traced reference."""
        if not params.paged:
            kc, vc = self.cache_views(cache, b, params.past_len + s)
            return kc, vc, params.get_write_index(kc.device)
        if (qk.device.type != "cpu" or getattr(params, "sequences", None) is None
                or has_quant_pages(cache) or params.slots.device != qk.device):
            return None
        kc, vc = cache.get_kv_state(self.layer_idx, 1, 0, 0)
        impl = ops.paged_attention.implementation(qk, qk, v, kc, vc, params, self.sliding_window or 0, self.scaling,
                                                  self.softcap)
        return None if impl.backend == "triton" else (kc, vc, params.slots)

    def attend(self, x, cache, attn_params: Params, loras=None) -> torch.Tensor:
        """Everything between the input norm and o_proj: returns (b, s, heads * head_dim)."""
        b, s = x.shape[0], x.shape[1]
        H, Hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        rope = self.rope() if self.uses_rope() else None
        # a decode step over a quantized cache writes the codes and reads them in one kernel call (below)
        quant = cache is not None and self._quant_decode(cache, attn_params, s, x)
        y = self.qkv.forward_plain(x, loras) if self.q_norm is None else None
        written = False  # k and v already in the plain cache
        if y is not None:
            # one fused output: q and k heads are adjacent, so RoPE rotates them in one go
            qk = y[..., :(H + Hkv) * d].view(b, s, H + Hkv, d)
            v = y[..., (H + Hkv) * d:].view(b, s, Hkv, d)
            target = (self._kv_write_target(attn_params, cache, b, s, qk, v)
                      if rope is not None and cache is not None and not quant else None)
            if target is not None:
                # and writes k and v into the cache in the same op (one C++ pass on the CPU: ops/cpu/small_ops.py)
                kc, vc, index = target
                cos, sin = attn_params.get_rope(rope, qk.device, qk.dtype)
                q = ops.rope_kv_write(qk, v, cos, sin, rope.style == RopeStyle.GPTJ, kc, vc, index, H)
                if attn_params.paged:
                    k = v = None  # in the pages already: ops.paged_attention is told so
                written = True
            else:
                if rope is not None:
                    qk = rope.rotate(qk, *attn_params.get_rope(rope, qk.device, qk.dtype))
                q, k = qk[:, :, :H], qk[:, :, H:]
        else:
            q, k, v = self.project_qkv(x, loras)
            if rope is not None:
                cos, sin = attn_params.get_rope(rope, q.device, q.dtype)
                q, k = rope.rotate(q, cos, sin), rope.rotate(k, cos, sin)
        if attn_params.paged:
            from .paged_attn import paged_attention
            return paged_attention(self, q, k, v, cache, attn_params)
        past = attn_params.past_len
        if quant:
            return self._attend_quant_decode(q, k, v, cache, attn_params)
        if cache is not None:
            if not written:
                kc, vc = self.cache_views(cache, b, past + s)
                # index_copy_, not a slice assignment: compiled, a slice assignment at a symbolic offset copies the
                # whole buffer
                index = attn_params.get_write_index(kc.device)
                kc.index_copy_(1, index, k if k.dtype == kc.dtype else k.to(kc.dtype))
                vc.index_copy_(1, index, v if v.dtype == vc.dtype else v.to(vc.dtype))
            k, v = kc[:, :past + s], vc[:, :past + s]
            if k.dtype != q.dtype:  # a cache in another dtype than the activations (fp32 ones, a bf16 cache)
                k, v = k.to(q.dtype), v.to(q.dtype)
            cache.store_kv_state(self.layer_idx, b, past, s)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        mask = attn_params.get_attn_mask(q.device, self.sliding_window)
        out = ops.attention(q, k, v, mask, self.scaling, self.softcap, s > 1 and mask is None)
        return out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)

    def _quant_decode(self, cache, params, s: int, x) -> bool:
        """Whether this step reads a quantized cache (cache_q.py) through the CPU kernel for quantized pages
        (csrc/attention_quant.cpp) instead of dequantising the layer's whole prefix into a temporary: one new token
        per row, no padding mask or position offsets, on the CPU with the cpu backend's kernels."""
        if (s != 1 or params.paged or not isinstance(cache, ExLlamaV2CacheQuantBase) or x.device.type != "cpu"
                or params.input_mask is not None or params.position_offsets is not None
                or params.rope_offsets is not None or torch.compiler.is_compiling()):
            return False
        return ("cpu" in dispatch.active_backends() and cache.key_states[self.layer_idx].is_contiguous()
                and cpu_attention.takes_quant_paged_decode_shape(x.dtype, self.head_dim))

    def _attend_quant_decode(self, q, k, v, cache, params: Params) -> torch.Tensor:
        """One new token per row over a quantized cache: its k/v quantised into the cache (as store_kv_state would),
        then attention straight from the codes, the rows seen as consecutive pages (runtime/cuda_graphs.py). The
        new token attends to itself as stored, as on the paged path; a prompt (several tokens) still attends to its
        own tokens as computed (the temporary path)."""
        b = q.shape[0]
        if b > cache.batch_size:
            raise ValueError(f"batch of {b} rows does not fit a cache built for batch_size={cache.batch_size}")
        flat, table, page, slots, lens = _quant_step(cache, params, b)
        pages = flat.paged_layer(self.layer_idx)
        kd, vd = (t[:, 0] if t.dtype == cache.dtype else t[:, 0].to(cache.dtype) for t in (k, v))
        if not cpu_attention.quant_write(pages, kd, vd, slots):
            pages.write(kd, vd, slots)
        out = cpu_attention.quant_paged_decode(q[:, 0], pages, table, lens, page, self.sliding_window or 0,
                                               self.scaling, self.softcap)
        return out.reshape(b, 1, self.num_heads * self.head_dim)


def _quant_step(cache, params: Params, b: int) -> tuple:
    """(the cache as pages, block tables (b, pages), page size, the new token's slots (b,), key counts (b,)) for a
    decode step over a quantized cache: built once per step, on its Params, and shared by every layer."""
    step = getattr(params, "_quant_step", None)
    if step is None or step[0] is not cache:
        from .runtime.cuda_graphs import contiguous_table, flat_view
        past = params.past_len
        table, page = contiguous_table(cache, "cpu", b)
        slots = table[:, past // page] * page + past % page
        lens = torch.full((b,), past + 1, dtype=torch.long)
        step = params._quant_step = (cache, cache if cache.batch_size == 1 else flat_view(cache), table, page, slots,
                                     lens)
    return step[1:]
