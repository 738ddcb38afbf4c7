"""The eager decode step's short path through a decoder layer on the `cpu` backend: the same kernel calls, in the
same order, as the modules' general forwards (attn.py, mlp.py) make, without the general forwards' per-call
decisions; where every linear is a single-type GGUF GEMV or the bf16 GEMV, each block is one C++ op
(ops/cpu/csrc/decode_block.cpp) that makes those calls itself.

Why: an eager SmolLM2 step (30 layers) spent ~1.3 ms of ~4.3 in Python deciding, per op and per layer, what the
previous step had already decided (backend choice, fused-linear checks, cast rules, cache layout, masks), and ~2 us
per op crossing from Python into torch's dispatcher. Eager decode is what the CLI, the server and every
intervention run. A layer's decisions are made once here, as a plan per (module, dtype, backend generation, kernel
epoch); each step then checks only what can change between calls.

Taken only where the result is the general forward's, bit for bit (tests/test_eager_decode.py):
- no LoRA, no intervention alive anywhere in the process, nothing traced, no gradients, no intermediates requested;
- a pre-norm RMSNorm block, no post-norm, a residual in the activations' dtype (the C++ blocks also take a
  post-norm, an fp32 residual stream and the input cast to the linears' dtype: Gemma 2/3's MLP; and attention with
  per-head q/k RMSNorms, Qwen3 and Gemma 3, whose masks of a sliding window they pass to the kernel);
- attention: one new token per row over a plain `ExLlamaV2Cache`, no mask (padding, sliding window in reach),
  fused q/k/v without q/k norms, RoPE written into the cache with k/v in one pass, the `cpu` backend's attention
  kernel;
- MLP: up to MLP_ROWS rows (batch x positions: decode steps, the dynamic generator's packed steps), fused gate/up
  and the `cpu` backend's act(gate) * up;
- linears on their prepared kernels with no prescale, none of them (nor the norm) replaced on the instance.
Anything else takes the general forward. A plan is remade when another norm or output linear is put in place of the
one it was made for, and it holds the prepared kernels weakly: it keeps none of a layer's weights alive
(model.unload() frees them).
"""

from __future__ import annotations

import weakref

import torch

from . import ops
from .architecture import RopeStyle
from .cache import ExLlamaV2Cache
from .cache_q import has_quant_pages
from .linear import ExLlamaV2Linear
from .module import interventions_alive
from .ops import dispatch
from .ops.cpu import attention as cpu_attention
from .ops.cpu import kernels, small_ops
from .ops.torch_ref import attention as ref_attention

_is_compiling = torch.compiler.is_compiling
# The MLP's short path takes calls of up to this many rows (batch x positions): decode steps and the dynamic
# generator's packed steps; a prompt's MLP, where Python's share of the time is small, keeps the general forward.
MLP_ROWS = 64


def _cast_dtype(lin, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype the linear's kernel gets `dtype` activations in (ExLlamaV2Linear.cast_input), or None where the
    linear is not run by its prepared kernel alone (prescale, forward replaced)."""
    if lin.prescale != 1 or "forward" in lin.__dict__:
        return None
    if lin.q_handle is None:
        return None if lin.weight is None else lin.weight.dtype
    return lin.dtype if dtype == torch.float32 and lin.dtype != torch.float32 else dtype


def _norm_ready(norm) -> bool:
    from .rmsnorm import ExLlamaV2RMSNorm
    return type(norm) is ExLlamaV2RMSNorm and not norm.output_fp32 and "forward" not in norm.__dict__


def _chooses_cpu(op, fn, *args) -> bool:
    """The op's backend choice for these arguments is the `cpu` backend's function `fn`."""
    try:
        impl = op.implementation(*args)
    except Exception:
        return False
    return impl.backend == "cpu" and impl.fn is fn


def _tail_ready(module) -> bool:
    """The block ends as the C++ blocks' `residual` does: an optional RMSNorm post-norm, then the residual add (in
    fp32 for an fp32 residual stream)."""
    from .attn import ExLlamaV2Attention
    from .mlp import ExLlamaV2MLP
    # exactly these classes: a subclass may override a step this path inlines
    return (type(module) in (ExLlamaV2Attention, ExLlamaV2MLP) and _norm_ready(module.pre_layernorm)
            and (module.post_layernorm is None or _norm_ready(module.post_layernorm))
            and getattr(module, "has_residual", True))


def _block_ready(module) -> bool:
    """The block the Python path and the plain C++ blocks take: no post-norm, a residual in the activations' dtype."""
    return _tail_ready(module) and module.post_layernorm is None and not module.archparams.residual_stream_fp32


def _tail_args(module, plan) -> None:
    post = module.post_layernorm
    plan.post = post
    plan.res32 = bool(module.archparams.residual_stream_fp32)


class _Plan:
    # norm, out: the block's input norm and last linear the plan was made for (_plan_for remakes it for others);
    # k1, k2: weak references to the two prepared kernels (_hold);
    # block: the C++ block op's linear arguments (csrc/decode_block.cpp), or None where a kernel is not one it takes;
    # block_rows: the most rows it takes (the bf16 GEMV's, where a linear is dense)
    # normed: the attention's per-head q/k norms, or the MLP's extended block (lin_dtype, post, res32: the input
    # cast, post-norm and fp32 residual the C++ blocks take; C++ only)
    __slots__ = ("key", "norm", "out", "ok", "k1", "k2", "interleaved", "sizes", "block", "block_rows", "paged",
                 "normed", "lin_dtype", "post", "res32", "__weakref__")

    def __init__(self, key, norm, out):
        self.key, self.norm, self.out = key, norm, out
        self.ok, self.block, self.block_rows, self.paged = False, None, 0, False
        self.normed, self.lin_dtype, self.post, self.res32 = None, None, None, False


def _hold(plan: _Plan, kernel):
    """A weak reference to a prepared kernel of `plan`: the linears own their kernels, and when one goes (its layer
    unloaded, a weight replaced) the plan lets go of the block arguments taken from it (the weights themselves) and
    is made again at the next step."""
    plan_ref = weakref.ref(plan)

    def gone(_):
        p = plan_ref()
        if p is not None:
            p.key, p.ok, p.block = None, False, None

    return weakref.ref(kernel, gone)


def _block_linear(k) -> tuple | None:
    """A prepared kernel as decode_block.cpp's linear arguments (w, kind, n, bias, super_scales) with the rows it
    takes them for, or None where its kernel is another (runs of several types, EXL2/GPTQ segments, oneDNN)."""
    from .ops.cpu.gemv_linear import GEMV_MAX_ROWS, DenseGemvKernel, GgufGemvKernel
    if type(k) is GgufGemvKernel and k.single is not None:
        qweight, kind, n = k.single
        return (qweight, kind, n, k.bias, k.super_scales), 1 << 30
    if type(k) is DenseGemvKernel and k.weight.dtype == torch.bfloat16:
        return (k.weight, -1, k.out_features, k.bias, None), GEMV_MAX_ROWS
    return None


def _block_kernels(fused, out, dtype: torch.dtype) -> tuple | None:
    """For the C++ blocks that cast their input: (the linears' dtype, the fused kernel, the output kernel, the
    block's linear arguments, the most rows it takes), or None where the linears compute in different dtypes or a
    kernel is not one the blocks take."""
    lin = {_cast_dtype(p, dtype) for p in fused.parts}
    if len(lin) != 1 or None in lin:
        return None
    lin = lin.pop()
    # the output linear gets the block's inner activations, already in `lin`
    if _cast_dtype(out, lin) != lin or lin not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    k1, k2 = fused.kernel(lin), out.kernel(lin)
    if k1 is False or k2 is False:
        return None
    a, b = _block_linear(k1), _block_linear(k2)
    if a is None or b is None:
        return None
    return lin, k1, k2, a[0] + b[0], min(a[1], b[1])


def _plan_block(plan: _Plan, k1, k2) -> None:
    a, b = _block_linear(k1), _block_linear(k2)
    if a is not None and b is not None and small_ops._kernels_ready():
        plan.block, plan.block_rows = a[0] + b[0], min(a[1], b[1])


def _plan_for(module, dtype: torch.dtype, out, build) -> _Plan:
    """The module's plan for `dtype` activations and its output linear `out` (o_proj, down_proj)."""
    key = (dtype, dispatch._generation, ExLlamaV2Linear.kernel_epoch)
    plan = module.__dict__.get("_eager_plan")
    if plan is None or plan.key != key or plan.norm is not module.pre_layernorm or plan.out is not out:
        plan = _Plan(key, module.pre_layernorm, out)
        try:
            build(module, dtype, plan)
        except Exception:
            plan.ok = False
        module._eager_plan = plan
    return plan


def _build_attn(attn, dtype: torch.dtype, plan: _Plan) -> None:
    if attn.q_norm is not None:
        _build_attn_normed(attn, dtype, plan)
        return
    if not attn.uses_rope() or not _block_ready(attn):
        return
    if attn.qkv.scaled or any(_cast_dtype(p, dtype) != dtype for p in (*attn.qkv.parts, attn.o_proj)):
        return
    k1, k2 = attn.qkv.kernel(dtype), attn.o_proj.kernel(dtype)
    if k1 is False or k2 is False:
        return
    d, H, Hkv = attn.head_dim, attn.num_heads, attn.num_kv_heads
    interleaved = attn.rope().style == RopeStyle.GPTJ
    w = attn.pre_layernorm.weight
    x = torch.zeros(1, 1, attn.pre_layernorm.size, dtype=dtype)
    qk = torch.zeros(1, 1, H + Hkv, d, dtype=dtype)
    v = torch.zeros(1, 1, Hkv, d, dtype=dtype)
    q = torch.zeros(1, H, 1, d, dtype=dtype)
    cs = torch.zeros(1, 1, 1, d, dtype=dtype)
    kc = torch.zeros(1, 2, Hkv, d, dtype=dtype)
    if not (_chooses_cpu(ops.rms_norm, small_ops.rms_norm, x, w, 1e-6, dtype)
            and _chooses_cpu(ops.rope_kv_write, small_ops.rope_kv_write, qk, v, cs, cs, interleaved, kc, kc,
                             torch.zeros(1, dtype=torch.long), H)
            and _chooses_cpu(ops.attention, cpu_attention.attention, q, q, q, None, attn.scaling, attn.softcap, False)):
        return
    plan.k1, plan.k2, plan.interleaved = _hold(plan, k1), _hold(plan, k2), interleaved
    if attn.qkv.total == (H + 2 * Hkv) * d and cpu_attention.takes(q, q, q, None, attn.softcap):
        _plan_block(plan, k1, k2)
        # the packed step's attention: the reference's paged_attention (the cpu backend's choice), which hands a
        # decode-only call to the cpu kernel when takes_paged_decode says so
        pages = torch.zeros(1, 2, Hkv, d, dtype=dtype)
        tables = torch.zeros(1, 1, dtype=torch.long)
        plan.paged = (plan.block is not None
                      and _chooses_cpu(ops.paged_attention, ref_attention.paged_attention, qk, None, None, pages,
                                       pages, None, 0, attn.scaling, attn.softcap)
                      and cpu_attention.takes_paged_decode(q[0], pages[0], pages[0], tables, tables[0]))
    plan.ok = True


def _head_norm_ready(norm, head_dim: int) -> bool:
    from .headnorm import ExLlamaV2HeadNorm
    return (type(norm) is ExLlamaV2HeadNorm and norm.is_rms and norm.weight is not None
            and tuple(norm.weight.shape) == (head_dim,) and "forward" not in norm.__dict__)


def _build_attn_normed(attn, dtype: torch.dtype, plan: _Plan) -> None:
    """Per-head q/k norms (attn.py: project_qkv, then rope on q and k, k/v copied into the cache): the C++ block
    attn_normed_decode_block only, where every step of that order runs the `cpu` backend's kernels."""
    d, H, Hkv = attn.head_dim, attn.num_heads, attn.num_kv_heads
    if (not attn.uses_rope() or not _tail_ready(attn) or attn.archparams.qk_norm_before_reshape
            or not _head_norm_ready(attn.q_norm, d) or not _head_norm_ready(attn.k_norm, d)
            or attn.qkv.scaled or attn.qkv.total != (H + 2 * Hkv) * d or not small_ops._kernels_ready()):
        return
    kernels_ = _block_kernels(attn.qkv, attn.o_proj, dtype)
    if kernels_ is None:
        return
    lin, k1, k2, block, block_rows = kernels_
    interleaved = attn.rope().style == RopeStyle.GPTJ
    x = torch.zeros(1, 1, attn.pre_layernorm.size, dtype=dtype)
    q = torch.zeros(1, 1, H, d, dtype=lin)
    qt = torch.zeros(1, H, 1, d, dtype=lin)
    cs = torch.zeros(1, 1, 1, d, dtype=lin)
    mask = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    post = attn.post_layernorm
    if not (_chooses_cpu(ops.rms_norm, small_ops.rms_norm, x, attn.pre_layernorm.weight, 1e-6, dtype)
            and _chooses_cpu(ops.rms_norm, small_ops.rms_norm, q, attn.q_norm.weight, 1e-6, lin)
            and _chooses_cpu(ops.rms_norm, small_ops.rms_norm, q, attn.k_norm.weight, 1e-6, lin)
            and (post is None or _chooses_cpu(ops.rms_norm, small_ops.rms_norm, x.to(lin), post.weight, 1e-6, lin))
            and _chooses_cpu(ops.rope, small_ops.rope, q, cs, cs, interleaved)
            and all(_chooses_cpu(ops.attention, cpu_attention.attention, qt, qt, qt, m, attn.scaling, attn.softcap,
                                 False) and cpu_attention.takes(qt, qt, qt, m, attn.softcap) for m in (None, mask))):
        return
    plan.k1, plan.k2, plan.interleaved = _hold(plan, k1), _hold(plan, k2), interleaved
    plan.block, plan.block_rows = block, block_rows
    plan.normed, plan.lin_dtype = (attn.q_norm, attn.k_norm), lin
    _tail_args(attn, plan)
    plan.ok = True


def _build_mlp_extended(mlp, dtype: torch.dtype, plan: _Plan) -> None:
    """An MLP with a post-norm, an fp32 residual stream or its input cast to the linears' dtype (Gemma 2/3): the C++
    block only."""
    gu = mlp.gate_up
    if (mlp.gate_proj is None or mlp.act_name not in small_ops._GATED or not _tail_ready(mlp) or gu.scaled
            or gu.sizes[0] != gu.sizes[1] or not small_ops._kernels_ready()):
        return
    kernels_ = _block_kernels(gu, mlp.down_proj, dtype)
    if kernels_ is None:
        return
    lin, k1, k2, block, block_rows = kernels_
    x = torch.zeros(1, 1, mlp.pre_layernorm.size, dtype=dtype)
    g = torch.zeros(1, 1, gu.sizes[0], dtype=lin)
    post = mlp.post_layernorm
    if not (_chooses_cpu(ops.rms_norm, small_ops.rms_norm, x, mlp.pre_layernorm.weight, 1e-6, dtype)
            and (post is None or _chooses_cpu(ops.rms_norm, small_ops.rms_norm, x.to(lin), post.weight, 1e-6, lin))
            and _chooses_cpu(ops.gated_activation, small_ops.gated_activation, g, g, mlp.act_name)):
        return
    plan.k1, plan.k2, plan.sizes = _hold(plan, k1), _hold(plan, k2), gu.sizes
    plan.block, plan.block_rows = block, block_rows
    plan.normed, plan.lin_dtype = True, lin
    _tail_args(mlp, plan)
    plan.ok = True


def _build_mlp(mlp, dtype: torch.dtype, plan: _Plan) -> None:
    if mlp.gate_proj is None or mlp.act_name not in small_ops._GATED:
        return
    gu = mlp.gate_up
    if not _block_ready(mlp) or any(_cast_dtype(p, dtype) != dtype for p in (*gu.parts, mlp.down_proj)):
        _build_mlp_extended(mlp, dtype, plan)
        return
    if gu.scaled:
        return
    k1, k2 = gu.kernel(dtype), mlp.down_proj.kernel(dtype)
    if k1 is False or k2 is False:
        return
    w = mlp.pre_layernorm.weight
    x = torch.zeros(1, 1, mlp.pre_layernorm.size, dtype=dtype)
    g = torch.zeros(1, 1, gu.sizes[0], dtype=dtype)
    if not (_chooses_cpu(ops.rms_norm, small_ops.rms_norm, x, w, 1e-6, dtype)
            and _chooses_cpu(ops.gated_activation, small_ops.gated_activation, g, g, mlp.act_name)):
        return
    plan.k1, plan.k2, plan.sizes = _hold(plan, k1), _hold(plan, k2), gu.sizes
    if gu.sizes[0] == gu.sizes[1]:
        _plan_block(plan, k1, k2)
    plan.ok = True


def _step_allowed(x: torch.Tensor, loras, kwargs) -> bool:
    return (not loras and not kwargs and x.device.type == "cpu" and not _is_compiling()
            and not torch.is_grad_enabled() and not interventions_alive())


def attention(attn, x: torch.Tensor, cache, params, loras, kwargs) -> torch.Tensor | None:
    """The attention block's output for a decode step, or None where the general forward must run."""
    if params is None or not _step_allowed(x, loras, kwargs):
        return None
    if params.paged:
        return _paged_attention(attn, x, cache, params)
    b, s = x.shape[0], x.shape[1]
    if s != 1 or type(cache) is not ExLlamaV2Cache:
        return None
    plan = _plan_for(attn, x.dtype, attn.o_proj, _build_attn)
    norm = plan.norm
    if (not plan.ok or "forward" in norm.__dict__ or not attn.qkv.runs() or "forward" in plan.out.__dict__
            or "attend" in attn.__dict__ or not _tail_unchanged(attn, plan)):
        return None
    if plan.normed is not None:
        return _normed_attention(attn, plan, x, cache, params)
    past = params.past_len
    if params.get_attn_mask(x.device, attn.sliding_window) is not None:
        return None
    kc, vc = attn.cache_views(cache, b, past + 1)
    H, Hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    if kc.dtype != x.dtype:
        return None
    cos, sin = params.get_rope(attn.rope(), x.device, x.dtype)
    index = params.get_write_index(x.device)
    if (plan.block is not None and b <= plan.block_rows and cos.dim() == 4 and cos.stride(-1) == 1
            and sin.stride(-1) == 1 and kc.stride(-1) == 1 and vc.stride(-1) == 1):
        return torch.ops.exllamav2_cpu.attn_decode_block.default(
            x, norm.weight, norm.variance_epsilon, *plan.block, cos, sin, plan.interleaved, kc, vc, index, H, d,
            past + 1, attn.scaling, attn.softcap, dispatch.cpu_activation_stages())
    k1, k2 = plan.k1(), plan.k2()
    if k1 is None or k2 is None:
        return None
    y = k1(small_ops.rms_norm(x, norm.weight, norm.variance_epsilon, x.dtype).reshape(b, -1))
    y = y.view(b, 1, -1)
    qk = y[..., :(H + Hkv) * d].view(b, 1, H + Hkv, d)
    v = y[..., (H + Hkv) * d:].view(b, 1, Hkv, d)
    q = small_ops.rope_kv_write(qk, v, cos, sin, plan.interleaved, kc, vc, index, H)
    k, v = kc[:, :past + 1], vc[:, :past + 1]
    out = cpu_attention.attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, attn.scaling,
                                  attn.softcap, False)
    o = k2(out.transpose(1, 2).reshape(b, H * d))
    return x + o.view(b, 1, -1)


def _tail_unchanged(module, plan: _Plan) -> bool:
    post = plan.post
    return module.post_layernorm is post and (post is None or "forward" not in post.__dict__)


def _normed_attention(attn, plan: _Plan, x: torch.Tensor, cache, params) -> torch.Tensor | None:
    q_norm, k_norm = plan.normed
    if (attn.q_norm is not q_norm or attn.k_norm is not k_norm or "forward" in q_norm.__dict__
            or "forward" in k_norm.__dict__ or x.shape[0] > plan.block_rows):
        return None
    b, past, lin = x.shape[0], params.past_len, plan.lin_dtype
    mask = params.get_attn_mask(x.device, attn.sliding_window)
    if mask is not None and not (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[0] in (1, b)
                                 and mask.shape[1:] == (1, 1, past + 1)):
        return None
    kc, vc = attn.cache_views(cache, b, past + 1)
    if kc.dtype != lin or vc.dtype != lin:
        return None
    cos, sin = params.get_rope(attn.rope(), x.device, lin)
    if cos.dim() != 4 or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        return None
    norm, post = plan.norm, plan.post
    return torch.ops.exllamav2_cpu.attn_normed_decode_block.default(
        x, norm.weight, norm.variance_epsilon, lin, *plan.block, q_norm.weight, q_norm.variance_epsilon,
        k_norm.weight, k_norm.variance_epsilon, cos, sin, plan.interleaved, kc, vc, params.get_write_index(x.device),
        mask, attn.num_heads, attn.head_dim, past + 1, attn.scaling, attn.softcap,
        None if post is None else post.weight, 0.0 if post is None else post.variance_epsilon, plan.res32,
        dispatch.cpu_activation_stages())


def _paged_attention(attn, x: torch.Tensor, cache, params) -> torch.Tensor | None:
    """The dynamic generator's packed decode step (one new token per sequence, PagedParams.decode_only) as the C++
    block, where the general forward writes k/v with RoPE into the pages and runs the cpu kernel over every
    sequence at once (attn.py: _kv_write_target; torch_ref/attention.py: paged_attention)."""
    if (x.shape[0] != 1 or getattr(params, "sequences", None) is None or not params.decode_only
            or x.shape[1] != params.seq_len or cache is None or cache.batch_size != 1 or has_quant_pages(cache)
            or params.slots.device.type != "cpu" or params.block_index.device.type != "cpu"
            or params.kv_lens.device.type != "cpu" or "cpu" not in dispatch.active_backends()):
        return None
    plan = _plan_for(attn, x.dtype, attn.o_proj, _build_attn)
    norm = plan.norm
    if (not plan.ok or not plan.paged or x.shape[1] > plan.block_rows or "forward" in norm.__dict__
            or not attn.qkv.runs() or "forward" in plan.out.__dict__ or "attend" in attn.__dict__
            or not _tail_unchanged(attn, plan)):
        return None
    kc, vc = cache.get_kv_state(attn.layer_idx, 1, 0, 0)
    if kc.dtype != x.dtype or vc.dtype != x.dtype or kc.stride(-1) != 1 or vc.stride(-1) != 1:
        return None
    cos, sin = params.get_rope(attn.rope(), x.device, x.dtype)
    if cos.dim() != 4 or cos.stride(-1) != 1 or sin.stride(-1) != 1:
        return None
    return torch.ops.exllamav2_cpu.paged_attn_decode_block.default(
        x, norm.weight, norm.variance_epsilon, *plan.block, cos, sin, plan.interleaved, kc, vc, params.slots,
        params.block_index, params.kv_lens, params.page_size, attn.sliding_window or 0, attn.num_heads,
        attn.head_dim, attn.scaling, attn.softcap, dispatch.cpu_activation_stages())


def mlp(module, x: torch.Tensor, loras, kwargs) -> torch.Tensor | None:
    """The MLP block's output for a decode step: every row of x (b, s, hidden) of up to MLP_ROWS rows in all (a decode
    step's rows, or the dynamic generator's packed step, one position per sequence), or None where the general
    forward must run."""
    if x.dim() != 3 or x.shape[0] * x.shape[1] > MLP_ROWS or not _step_allowed(x, loras, kwargs):
        return None
    plan = _plan_for(module, x.dtype, module.down_proj, _build_mlp)
    norm = plan.norm
    if (not plan.ok or "forward" in norm.__dict__ or not module.gate_up.runs() or "forward" in plan.out.__dict__
            or "activate" in module.__dict__ or not _tail_unchanged(module, plan)):
        return None
    b, s = x.shape[0], x.shape[1]
    act = small_ops._GATED.get(module.act_name)  # read at each call, as activate() reads it
    if plan.block is not None and act is not None and b * s <= plan.block_rows and kernels.active_avx512():
        post = plan.post
        return torch.ops.exllamav2_cpu.mlp_decode_block.default(
            x, norm.weight, norm.variance_epsilon, *plan.block, act, dispatch.cpu_activation_stages(),
            plan.lin_dtype or x.dtype, None if post is None else post.weight,
            0.0 if post is None else post.variance_epsilon, plan.res32)
    if plan.normed is not None:  # the extended block has no Python twin here: the general forward
        return None
    k1, k2 = plan.k1(), plan.k2()
    if k1 is None or k2 is None:
        return None
    y = k1(small_ops.rms_norm(x, norm.weight, norm.variance_epsilon, x.dtype).reshape(b * s, -1))
    gate, up = y.split(plan.sizes, dim=-1)
    a = small_ops.gated_activation(gate, up, module.act_name)
    return x + k2(a).view(b, s, -1)
