"""`exllamav2::moe_grouped_experts`: an MoE layer's grouped expert path (ExLlamaV2MoEMLP.forward_grouped) as one
custom op, so that a compiled decode step on the CPU runs only the experts its tokens picked.

The grouped path reads the tokens-per-expert counts on the host (`.tolist()`), which a graph traced whole
(fullgraph) cannot hold. Inside a custom op dynamo sees one node whose output shape the fake implementation gives;
the op's body runs eagerly at every step: the very code of the eager grouped path, so its result is the eager
path's to the bit, the `pre_down_point` hook included.

An op's arguments are tensors and numbers, not modules: each MoE module registers itself at construction and
passes its int handle. The registry holds modules weakly (a model that is dropped takes its entries with it) and
never reuses a handle, so a graph that outlives its model fails with a clear error instead of running another
model's experts. Unloading and reloading a model keeps its modules, so their handles stay valid.
"""

from __future__ import annotations

import itertools
import weakref

import torch

_modules: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()
_handles = itertools.count()


def register(module) -> int:
    """A new handle for an MoE module (anything with `forward_grouped(x, weights, ids)`)."""
    handle = next(_handles)
    _modules[handle] = module
    return handle


def registered(handle: int):
    """The module of a handle, or None when it was freed."""
    return _modules.get(handle)


@torch.library.custom_op("exllamav2::moe_grouped_experts", mutates_args=())
def moe_grouped_experts(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, handle: int) -> torch.Tensor:
    """x (..., hidden) the layer's normed input, weights (T, k) fp32 and ids (T, k) its routing (T = tokens in x):
    the weighted expert sum (T, hidden) in x's dtype."""
    module = _modules.get(handle)
    if module is None:
        raise RuntimeError(f"exllamav2::moe_grouped_experts: no MoE module has handle {handle} (its model was "
                           "freed; a compiled step must not outlive its model)")
    return module.forward_grouped(x, weights, ids)


@moe_grouped_experts.register_fake
def _(x, weights, ids, handle):
    torch._check(weights.shape == ids.shape, lambda: "moe_grouped_experts: weights and ids differ in shape")
    return x.new_empty(weights.shape[0], x.shape[-1])
