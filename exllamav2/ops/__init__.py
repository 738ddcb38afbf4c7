"""The ops the modules call, each with implementations per backend (see dispatch.py for the choice).

- `prepare_linear(...)` -> a kernel for one (possibly fused) weight, chosen once per device and dtype
- `rms_norm`, `layer_norm`
- `rope` (rotate (b, s, heads, head_dim) by gathered cos/sin), `rope_kv_write` (rope on a fused q|k, k and v
  written into a plain cache: torch_ref/rope_kv.py)
- `attention` (contiguous KV prefix), `paged_attention` (packed tokens over a paged cache),
  `quant_paged_attention` (the same over a quantized paged cache: torch_ref/attention_quant.py)
- `activation`, `gated_activation`
- `softmax_temperature`, `top_candidates` (the sampler's vocabulary-wide steps)

Backends: `torch` (torch_ref/, the reference), `cpu` (cpu/), `triton` (triton/: GPU kernels, run on CPU tensors
under TRITON_INTERPRET=1; an op without a Triton kernel fails with a message that says so when triton is pinned).
"""

from __future__ import annotations

import torch

from . import dispatch
from .cpu import linear as cpu_linear
from .cpu import attention as _cpu_attn
from .cpu import small_ops as _cpu_small
from .dispatch import NoBackendError, active_backends, pinned_backend, set_backend, use_backend
from .torch_ref import activation as _act
from .torch_ref import attention as _attn
from .torch_ref import attention_quant as _attn_q
from .torch_ref import linear as torch_linear
from .torch_ref import norm as _norm
from .torch_ref import rope as _rope
from .torch_ref import rope_kv as _rope_kv
from .torch_ref import sampling as _sampling
from .triton import linear as triton_linear
from .triton import attention as _tri_attn
from .triton import attention_quant as _tri_attn_q

# filled now, not at first use inside a step being traced: dynamo would guard on the list being empty, a guard
# that fails at every later call (runtime/guards.py then cannot run the compiled step directly)
_attn._cpu_modules()

__all__ = ["NoBackendError", "set_backend", "use_backend", "pinned_backend", "active_backends", "prepare_linear",
           "rms_norm", "layer_norm", "rope", "rope_kv_write", "attention", "paged_attention", "quant_paged_attention",
           "activation", "gated_activation", "softmax_temperature", "top_candidates", "set_batch_invariant",
           "batch_invariant", "set_cpu_activations", "cpu_activations"]


def set_batch_invariant(enabled: bool | None = True) -> None:
    """Whether a linear kernel computes each row independently of how many rows share the call, so that a request's
    tokens are the same alone or batched with others. Process-wide; also `EXLLAMAV2_BATCH_INVARIANT=1|0|auto`.

    None ("auto", the default): invariant wherever it is cheap: on the CPU with the C++ kernels every linear is
    (packed GGUF, EXL2 and GPTQ weights, and dense bf16/fp16/fp32 weights through their GEMV at every row count,
    ops/cpu/gemv_linear.py); the triton backend's quantized linears switch to a dense GEMM above DENSE_ROWS.
    True (serve --deterministic): every kernel, at any cost: the triton linears stay on their fused kernel, and
    without the C++ kernels the CPU's dense linears run one row per call. False: the fastest kernel for each row
    count (dense CPU prefill through oneDNN: bench/bench_determinism.py measures what invariance costs)."""
    dispatch.set_batch_invariant(enabled)


def batch_invariant() -> bool:
    return dispatch.batch_invariant()


def set_cpu_activations(name: str) -> None:
    """How the CPU's GGUF kernels (and EXL2/GPTQ weights repacked for them) quantise activations for their int8 dot
    products. "int16" (the default): int8 plus an int8 of its rounding residual, ~1e-5 relative error, so logits
    follow the fp reference (HF transformers) closely. "int8": the int8 alone, llama.cpp's own q8_0 activations
    (~0.5% relative error per dot product, small beside 4-bit weights' own), at half the dot products: prefill and
    batched decode, which are compute-bound, run ~1.2-1.4x faster (SmolLM2, README "CPU kernels"). Rows stay
    independent of each other in both. Process-wide; `EXLLAMAV2_CPU_ACTIVATIONS=int8` sets it at start-up. Compiled decode steps recompile for it."""
    dispatch.set_cpu_activations(name)


def cpu_activations() -> str:
    return next(k for k, v in dispatch.CPU_ACTIVATIONS.items() if v == dispatch.cpu_activation_stages())


rms_norm = dispatch.define_op("rms_norm", lambda x, w, eps, out_dtype: (x.device.type, x.dtype, w.dtype, out_dtype))
layer_norm = dispatch.define_op("layer_norm", lambda x, w, b, eps, out_dtype, fp32_stats=False:
                                (x.device.type, x.dtype, w.dtype, out_dtype, fp32_stats))
rope = dispatch.define_op("rope", lambda x, cos, sin, interleaved: (x.device.type, x.dtype, interleaved))
rope_kv_write = dispatch.define_op("rope_kv_write", lambda qk, v, cos, sin, interleaved, kc, vc, index, q_heads:
                                   (qk.device.type, qk.dtype, kc.dtype, interleaved))
attention = dispatch.define_op("attention", lambda q, k, v, mask, scale, softcap=0.0, is_causal=False:
                               (q.device.type, q.dtype, q.shape[-1], mask is None, bool(softcap), is_causal))
paged_attention = dispatch.define_op("paged_attention", lambda q, k, v, kp, vp, params, sliding_window, scale,
                                     softcap=0.0: (q.device.type, q.dtype, q.shape[-1], kp.dtype, kp.dim(),
                                                   bool(softcap)))
quant_paged_attention = dispatch.define_op(
    "quant_paged_attention", lambda q, k, v, pages, params, sliding_window, scale, softcap=0.0:
    (q.device.type, q.dtype, q.shape[-1], pages.k_format.name, pages.v_format.name, bool(softcap)))
activation = dispatch.define_op("activation", lambda x, act: (x.device.type, x.dtype, act))
gated_activation = dispatch.define_op("gated_activation", lambda g, u, act: (g.device.type, g.dtype, act))
softmax_temperature = dispatch.define_op("softmax_temperature", lambda x, t, sf: (x.device.type, x.dtype))
top_candidates = dispatch.define_op("top_candidates", lambda p, k: (p.device.type, p.dtype))

_REFERENCE = {
    rms_norm: _norm.rms_norm, layer_norm: _norm.layer_norm, rope: _rope.rope, rope_kv_write: _rope_kv.rope_kv_write,
    attention: _attn.attention,
    paged_attention: _attn.paged_attention, quant_paged_attention: _attn_q.quant_paged_attention,
    activation: _act.activation, gated_activation: _act.gated_activation,
    softmax_temperature: _sampling.softmax_temperature, top_candidates: _sampling.top_candidates,
}


def _cpu_only(*args, **kwargs):
    return dispatch.on_cpu(args[0])


for _op, _fn in _REFERENCE.items():
    _op.register("torch", _fn)
    # the CPU backend runs the reference code on CPU tensors until its own kernels replace it (see cpu/)
    _op.register("cpu", _fn, _cpu_only)
rms_norm.register("cpu", _cpu_small.rms_norm, _cpu_only)  # the C++ kernel in eager mode (cpu/small_ops.py)
attention.register("cpu", _cpu_attn.attention, _cpu_only)  # the C++ kernel for decode rows (cpu/attention.py)
rope.register("cpu", _cpu_small.rope, _cpu_only)  # the C++ kernel in eager mode (cpu/small_ops.py)
rope_kv_write.register("cpu", _cpu_small.rope_kv_write, _cpu_only)  # the same, one C++ pass
gated_activation.register("cpu", _cpu_small.gated_activation, _cpu_only)  # act(gate) * up, one C++ pass

# Triton attention kernels (triton/attention.py; the kernel modules themselves are imported at first call)
attention.register("triton", _tri_attn.attention, _tri_attn.declines_attention)
paged_attention.register("triton", _tri_attn.paged_attention, _tri_attn.declines_paged)
quant_paged_attention.register("triton", _tri_attn_q.quant_paged_attention, _tri_attn_q.declines_quant_paged)


# ---------------------------------------------------------------------------------------------- linear

_LINEAR_PREPARE = {"torch": torch_linear.prepare, "cpu": cpu_linear.prepare, "triton": triton_linear.prepare}


def prepare_linear(dense: torch.Tensor | None, bias: torch.Tensor | None, quant, device, dtype: torch.dtype,
                   name: str = "linear"):
    """A kernel for one weight (dense (out, in) tensor, or a QuantWeight) taking activations of `dtype` on
    `device`: the first backend that accepts. The kernel is called on 2-D inputs (rows, in_features)."""
    device = torch.device(device)
    reasons = []
    for b in active_backends():
        prep = _LINEAR_PREPARE.get(b)
        if prep is None:
            reasons.append(f"{b}: no linear kernels yet")
            continue
        k = prep(dense, bias, quant, device, dtype)
        if not isinstance(k, str):
            return k
        reasons.append(f"{b}: {k}")
    pin = f" (backend pinned to '{pinned_backend()}')" if pinned_backend() else ""
    raise NoBackendError(f"no backend accepts op 'linear' for {name}{pin}: " + "; ".join(reasons))
