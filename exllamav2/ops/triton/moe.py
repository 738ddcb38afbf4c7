"""An MoE layer's experts on the `triton` backend with no host sync (kernels: moe_kernels.py).

The eager grouped path (exllamav2/moe_mlp.py: forward_grouped) counts tokens per expert on the host; the static
path reads every expert's weights for every token. Here the routing is grouped on the device with a fixed number
of blocks for a given token count (`route_blocks`), and the two kernels find each block's expert through tables of
the experts' tensor addresses (`ExpertTables`, built from the linears' own prepared Triton kernels: no copy of any
weight). So a decode step can be captured in a CUDA graph and reads only the experts its tokens picked.

Takes: experts whose Triton kernels are dense (F.linear on the module's own weight, in the activations' dtype),
GGUF blocks of one type per projection, EXL2 (any widths, each expert its own groups) or GPTQ (4 or 8 bits, the
same bits, zero convention and grouping for every expert of a projection), all experts of a projection of one
format and shape, no bias; the activations the kernel
knows (`_act_codes`). Anything else is declined with a reason, and the module runs its other paths.
"""

from __future__ import annotations

import functools

import torch

from . import interpreting, kernels
from .linear import triton_cdiv

DENSE_FMT, EXL2_FMT, GPTQ_FMT = 16, 17, 32  # moe_kernels' codes; GGUF types use gguf_kernels.QTYPE_CODES (0-15)
BLOCK_K = 64  # moe_kernels.BLOCK_K: the K tile of dense and GGUF experts


@functools.lru_cache(maxsize=None)
def _act_codes() -> dict:
    """The activation functions the kernel computes (exllamav2/ops/torch_ref/activation.py), by function."""
    from ..torch_ref.activation import ACTIVATIONS
    names = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3, "quickgelu": 4}
    return {ACTIVATIONS[n]: code for n, code in names.items()}


class ExpertTables:
    """One projection kind's experts (all of w1, w3 or w2) as an int64 table (6, E) on the device, the addresses
    and numbers moe_kernels._project reads per expert (row 0 the weight: dense matrix, GGUF blocks, EXL2 q_weight
    or GPTQ qweight; rows 1-5 the other EXL2 / GPTQ tensors and numbers); with the format code, two numbers per
    format (GGUF bytes per row; EXL2 / GPTQ row strides) and the K tile. Holds the kernels, so the addresses stay
    valid while the table lives."""

    def __init__(self, kernel_list: list, what: str):
        from .linear import DenseKernel
        first = kernel_list[0]
        self.kernels = kernel_list
        self.in_features, self.out_features = first.in_features, first.out_features
        if isinstance(first, DenseKernel):
            self.fmt, self.params, self.block_k = DENSE_FMT, (0, 0), BLOCK_K
            rows = [[k.weight] for k in kernel_list]
        elif _is_gguf(first):
            # moe_kernels tells the formats apart by code: GGUF's must stay below the others'
            assert first.qcode < DENSE_FMT, f"GGUF type code {first.qcode} collides with the MoE format codes"
            self.fmt, self.params, self.block_k = first.qcode, (first.row_bytes, 0), BLOCK_K
            rows = [[k.blocks] for k in kernel_list]
        elif type(first).__name__ == "Exl2Kernel":
            self.fmt, self.params = EXL2_FMT, (first.qw.stride(0), first.qs.stride(0))
            self.block_k = min(k.block_k for k in kernel_list)  # the choices divide each other (64, 32, 16)
            rows = [[k.qw, k.qs, k.table, k.smax, k.perm, k.num_groups] for k in kernel_list]
        elif type(first).__name__ == "GptqKernel":
            # in-order groups only when every expert has them; otherwise all look each row's group up (g_idx is
            # resident for every expert, so that reads any of them right)
            seq = all(k.seq_groups for k in kernel_list)
            self.fmt = GPTQ_FMT + 4 * first.bits + 2 * first.zero_plus + int(seq)
            self.params, self.block_k = (first.qw.stride(0), first.sc.stride(0)), first.block_k
            rows = [[k.qw, k.qz, k.sc, k.gidx, k.qz.stride(0), k.group_size] for k in kernel_list]
        else:
            raise _Declined(f"{what}: {type(first).__name__} experts (the grouped kernel reads dense, GGUF, EXL2 "
                            "and GPTQ ones)")
        for k in kernel_list:
            if type(k) is not type(first) or (k.in_features, k.out_features) != (self.in_features, self.out_features):
                raise _Declined(f"{what}: experts differ in format or shape")
            if getattr(k, "bias", None) is not None:
                raise _Declined(f"{what}: experts with a bias")
            if _is_gguf(k) and (k.qcode, k.row_bytes) != (self.fmt, self.params[0]):
                raise _Declined(f"{what}: experts in different GGUF types")
            if self.fmt == EXL2_FMT and (k.qw.stride(0), k.qs.stride(0)) != self.params:
                raise _Declined(f"{what}: EXL2 experts with different strides")
            if self.fmt >= GPTQ_FMT and (GPTQ_FMT + 4 * k.bits + 2 * k.zero_plus + int(seq), k.qw.stride(0),
                                         k.sc.stride(0), k.block_k) != (self.fmt, *self.params, self.block_k):
                raise _Declined(f"{what}: GPTQ experts with different bits, zero convention or strides")
        for r in rows:
            if any(isinstance(t, torch.Tensor) and not t.is_contiguous() for t in r):
                raise _Declined(f"{what}: an expert's weight is not contiguous")
        table = [[t.data_ptr() if isinstance(t, torch.Tensor) else int(t) for t in r] + [0] * (6 - len(r))
                 for r in rows]
        # the kernels may load whole aligned vectors when every row of the streamed tensors starts 64-byte aligned
        # (the promise moe_kernels._project makes to the compiler)
        streamed = {DENSE_FMT: [0], EXL2_FMT: [0]}.get(self.fmt, [0, 2] if self.fmt >= GPTQ_FMT else [])
        self.aligned = bool(streamed) and all(
            r[i].data_ptr() % 64 == 0 and (r[i].stride(0) * r[i].element_size()) % 64 == 0
            for r in rows for i in streamed)
        self.table = torch.tensor(table, dtype=torch.int64).t().contiguous().to(rows[0][0].device)


class _Declined(Exception):
    pass


def _is_gguf(kernel) -> bool:
    # gguf_linear.GgufKernel, by its attributes: that module is loaded once per interpreter mode (kernels()), so
    # its class is not one object
    return type(kernel).__name__ == "GgufKernel" and hasattr(kernel, "qcode") and hasattr(kernel, "blocks")


def expert_tables(w1: list, w3: list, w2: list, act, dtype: torch.dtype):
    """(tables for w1, w3, w2) from the expert linears' Triton kernels for `dtype`, or the reason they cannot run
    here (a string). `act`: the module's activation function."""
    if act not in _act_codes():
        return f"activation {getattr(act, '__name__', act)!r} (the grouped kernel has silu, gelu, gelu_tanh, relu, quickgelu)"
    try:
        ks = [[lin.kernel(dtype) for lin in group] for group in (w1, w3, w2)]
    except Exception as e:  # a linear no backend takes for this dtype: the module's other paths say why
        return f"no kernels for the experts: {e}"
    if any(getattr(k, "backend", None) != "triton" for group in ks for k in group):
        return "the experts' linears run on another backend"
    try:
        tables = tuple(ExpertTables(group, what) for group, what in zip(ks, ("w1", "w3", "w2")))
    except _Declined as e:
        return str(e)
    t1, t3, t2 = tables
    if (t3.in_features, t3.out_features, t2.in_features, t2.out_features) != (t1.in_features, t1.out_features,
                                                                             t1.out_features, t1.in_features):
        return (f"expert shapes do not chain: w1 {t1.out_features}x{t1.in_features}, w3 {t3.out_features}x"
                f"{t3.in_features}, w2 {t2.out_features}x{t2.in_features}")
    return tables


def route_blocks(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The assignments (token t's j-th ranked expert is assignment t * k + j) grouped by expert in blocks of
    `block_m` (moe_kernels.moe_route, one launch): (rows (blocks * block_m,) int32: assignment indices, A = T * k
    in padding; experts (blocks,) int32: each block's expert, -1 past the last). No host sync; the block count,
    ceil(A / block_m) + min(E, A), bounds sum over experts of ceil(count / block_m) and depends on A alone. Within
    an expert, assignments keep their order."""
    T, k = ids.shape
    A, E = T * k, num_experts
    n_blocks = triton_cdiv(A, block_m) + min(E, A)
    rows = torch.empty(n_blocks * block_m, dtype=torch.int32, device=ids.device)
    experts = torch.empty(n_blocks, dtype=torch.int32, device=ids.device)
    if A == 0:
        return rows, experts
    mod = kernels("moe_kernels", ids.device.type == "cpu" and interpreting())
    flat = ids.reshape(-1)
    flat = flat if flat.dtype == torch.int64 and flat.is_contiguous() else flat.to(torch.int64).contiguous()
    mod.moe_route[(1,)](flat, rows, experts, A, E, n_blocks, BLOCK_M=block_m, E_PAD=_pow2(E),
                        CHUNK=mod.ROUTE_CHUNK, num_warps=4)
    return rows, experts


def block_n(n: int, largest: int) -> int:
    """Output features a program takes: the largest tile (halving down to 16) that still cuts n into 128 tiles or
    more, so a decode step's few active blocks keep the GPU's SMs busy (Mixtral's 4096-wide down projection at
    one token: 2 blocks x 128 tiles of 32, not 2 x 64 of 64). From the shape alone: a token's result never
    depends on the batch."""
    bn = largest
    while bn > 16 and triton_cdiv(n, bn) < 128:
        bn //= 2
    return bn


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def grouped_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, tables, act,
                    pre_down=None) -> torch.Tensor:
    """The experts' weighted sum (T, hidden) for x (T, hidden), routing weights (T, k) fp32 and ids (T, k).
    `pre_down` (optional): called with the (T, k * I) activations the down projections read and returns the
    tensor they read (the module's hook point)."""
    t1, t3, t2 = tables
    T, H = x.shape
    k = ids.shape[1]
    A, I, E = T * k, t1.out_features, t1.table.shape[1]
    interpret = x.device.type == "cpu" and interpreting()
    mod = kernels("moe_kernels", interpret)
    bm = mod.TILE["BLOCK_M"]
    dot_f32 = interpret and x.dtype == torch.bfloat16
    x = x if x.stride(1) == 1 else x.contiguous()
    rows, experts = route_blocks(ids, E, bm)
    n_blocks = experts.shape[0]

    act_buf = torch.empty((A, I), dtype=x.dtype, device=x.device)
    bn = block_n(I, mod.TILE["BLOCK_N"])
    mod.moe_gate_up[(n_blocks, triton_cdiv(I, bn))](
        x, rows, experts, act_buf, t1.table, t3.table, A, E, H, I, *t1.params, *t3.params, x.stride(0),
        TOPK=k, FMT1=t1.fmt, FMT3=t3.fmt, BK1=t1.block_k, BK3=t3.block_k, ALN1=t1.aligned, ALN3=t3.aligned,
        ACT=_act_codes()[act], BLOCK_M=bm,
        BLOCK_N=bn, DOT_F32=dot_f32)
    if pre_down is not None:
        # a hook may hand back another dtype (fp32, say): the kernel reads its input as x's dtype, as the grouped
        # path's linears cast theirs
        act_buf = pre_down(act_buf.view(T, k * I)).reshape(A, I).to(x.dtype).contiguous()

    out = torch.empty((A, H), dtype=x.dtype, device=x.device)
    bn = block_n(H, mod.TILE["BLOCK_N"])
    mod.moe_down[(n_blocks, triton_cdiv(H, bn))](
        act_buf, rows, experts, weights.reshape(-1).float().contiguous(), out, t2.table, A, E, I, H, *t2.params,
        FMT2=t2.fmt, BK2=t2.block_k, ALN2=t2.aligned, BLOCK_M=bm, BLOCK_N=bn, DOT_F32=dot_f32)

    # each token's rows added in expert order from zero, as the grouped path's index_add over experts does
    y = torch.empty((T, H), dtype=x.dtype, device=x.device)
    ids64 = ids if ids.dtype == torch.int64 and ids.is_contiguous() else ids.to(torch.int64).contiguous()
    mod.moe_combine[(T, triton_cdiv(H, mod.COMBINE_BLOCK))](out, ids64, y, H, TOPK=k, K_PAD=_pow2(k),
                                                            BLOCK_H=mod.COMBINE_BLOCK)
    return y
