"""Triton kernel shared by the quantized linears: the split-K reduction.

`splitk_reduce` adds a (splits, M, N) fp32 partial buffer over the splits in index order (a fixed order, no atomics:
a row's result never depends on the other rows), adds the bias and writes the output dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def splitk_reduce(part_ptr, bias_ptr, out_ptr, M, N, SPLITS, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.load(part_ptr + offs, mask=mask, other=0.0)
    for s in range(1, SPLITS):
        acc += tl.load(part_ptr + s * M * N + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


REDUCE_BLOCK = 1024

AOT_SPECS = [
    {"kernel": "splitk_reduce",
     "signature": {"part_ptr": "*fp32", "bias_ptr": f"*{dt}", "out_ptr": f"*{dt}", "M": "i32", "N": "i32",
                   "SPLITS": "i32", "HAS_BIAS": "constexpr", "BLOCK": "constexpr"},
     "constexprs": {"HAS_BIAS": has_bias, "BLOCK": REDUCE_BLOCK}}
    for dt in ("fp16", "bf16") for has_bias in (False, True)
]
