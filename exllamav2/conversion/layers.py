"""Running one model module at a time over the calibration hidden states, collecting the Hessians of the
inputs of its linear layers, and substituting quantized weights."""

from __future__ import annotations

import contextlib

import torch

from ..attn import ExLlamaV2Attention
from ..attn_params import Params
from ..linear import ExLlamaV2Linear
from ..mlp import ExLlamaV2MLP


class UnsupportedModuleError(NotImplementedError):
    pass


def linear_stages(module) -> list[tuple[str, list[ExLlamaV2Linear]]]:
    """The module's linears grouped by the intermediate that feeds them, in forward order. Quantizing a stage
    changes the inputs of the next, so stages are quantized one after another."""
    if isinstance(module, ExLlamaV2Attention):
        stages = [("post_norm", [module.q_proj, module.k_proj, module.v_proj]), ("attn_output", [module.o_proj])]
    elif isinstance(module, ExLlamaV2MLP):
        first = [m for m in (module.gate_proj, module.up_proj) if m is not None]
        stages = [("post_norm", first), ("pre_down", [module.down_proj])]
    else:
        raise UnsupportedModuleError(f"{module.key}: {type(module).__name__} modules cannot be converted "
                                     "(supported: attention and dense MLP layers)")
    for _, linears in stages:
        for lin in linears:
            if lin.f_key is not None:
                raise UnsupportedModuleError(f"{lin.key}: fused source tensor {lin.f_key} is not supported by the converter")
    return stages


def _forward(module, x: torch.Tensor, intermediates: bool):
    b, s = x.shape[0], x.shape[1]
    return module.forward(x, cache=None, attn_params=Params(b, s, 0), intermediates=intermediates)


def run_module(module, states: torch.Tensor, batch_rows: int, capture: str | list[str] | None = None,
               keep_output: bool = True, split: bool = False):
    """Forward the (rows, length, hidden) fp32 CPU states through module in batches of rows.
    Returns (output states (fp32, CPU) or None, H = sum of X^T X over every token of the intermediate
    `capture`, or None). With split, H is a pair (even rows, odd rows): a fit and a held-out Hessian.
    With a list of captures, one pass gives {capture: H} for each."""
    device = module.device()
    dtype = module.model.dtype
    captures = [] if capture is None else [capture] if isinstance(capture, str) else list(capture)
    H = {c: [None, None] for c in captures}
    out = torch.empty_like(states) if keep_output else None
    for a in range(0, states.shape[0], batch_rows):
        x = states[a:a + batch_rows].to(device, dtype)
        if not captures:
            y = _forward(module, x, False)
        else:
            r = _forward(module, x, True)
            for c in captures:
                X = r[c].to(torch.float32)
                # with split, batch row j is calibration row a + j: even rows go to H[0], odd rows to H[1]
                parts = ((a % 2, X[0::2]), ((a + 1) % 2, X[1::2])) if split else ((0, X),)
                Hc = H[c]
                for k, part in parts:
                    if part.numel():
                        P = part.reshape(-1, part.shape[-1])
                        Hc[k] = P.T @ P if Hc[k] is None else Hc[k].addmm_(P.T, P)
            y = r["hidden_states"]
        if keep_output:
            out[a:a + batch_rows] = y.to(torch.float32).cpu()
    result = {c: (tuple(h) if split else h[0]) for c, h in H.items()}
    if isinstance(capture, str):
        return out, result[capture]
    return out, (result if capture is not None else None)


def stage_input(module, x: torch.Tensor, capture: str) -> torch.Tensor | None:
    """The intermediate `capture` without running the whole module, where that is only the module's input norm
    ("post_norm" of attention and MLP modules: pre_layernorm(x), as their forward computes it); else None."""
    if capture != "post_norm" or not isinstance(module, (ExLlamaV2Attention, ExLlamaV2MLP)):
        return None
    return module.pre_layernorm.forward(x) if module.pre_layernorm is not None else x


@contextlib.contextmanager
def swapped_weights(weights: dict):
    """Within the block the given linears compute with {linear: weight Parameter}; their own weights come back after."""
    current = {lin: lin.weight for lin in weights}
    try:
        for lin, w in weights.items():
            lin.weight = w
        yield
    finally:
        for lin, w in current.items():
            lin.weight = w


def run_module_captures(module, states: torch.Tensor, batch_rows: int, captures: list[str]):
    """One pass of the module as it is over states: (output states, {capture: intermediate}), all fp32 on the CPU,
    computed batch by batch exactly as run_module and run_module_paired compute them."""
    device = module.device()
    dtype = module.model.dtype
    out = torch.empty_like(states)
    kept = {}
    for a in range(0, states.shape[0], batch_rows):
        r = _forward(module, states[a:a + batch_rows].to(device, dtype), True)
        for c in captures:
            x = r[c].to(torch.float32).cpu()
            if c not in kept:
                kept[c] = torch.empty((states.shape[0],) + tuple(x.shape[1:]), dtype=torch.float32)
            kept[c][a:a + batch_rows] = x
        out[a:a + batch_rows] = r["hidden_states"].to(torch.float32).cpu()
    return out, kept


def run_module_paired(module, states: torch.Tensor, ref_states: torch.Tensor | None, reference: dict | None,
                      batch_rows: int, capture: str,
                      ref_captured: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """H = sum X^T X and C = sum X_ref^T X over the intermediate `capture`, where X comes from the module as it is
    (earlier linears already quantized) on `states`, and X_ref from the module with the `reference` weights
    {linear: weight Parameter} swapped in, on `ref_states` (the unquantized model's hidden states).
    ref_captured: X_ref already computed (run_module_captures with the reference weights), so the reference
    forward is not repeated for every stage; the sums are the same, batch by batch."""
    device = module.device()
    dtype = module.model.dtype
    H = C = None
    for a in range(0, states.shape[0], batch_rows):
        x = states[a:a + batch_rows].to(device, dtype)
        X = stage_input(module, x, capture)
        X = (X if X is not None else _forward(module, x, True)[capture]).to(torch.float32)
        if ref_captured is not None:
            R = ref_captured[a:a + batch_rows].to(device)
        else:
            with swapped_weights(reference):
                R = _forward(module, ref_states[a:a + batch_rows].to(device, dtype), True)[capture].to(torch.float32)
        X = X.reshape(-1, X.shape[-1])
        R = R.reshape(-1, R.shape[-1])
        H = X.T @ X if H is None else H.addmm_(X.T, X)
        C = R.T @ X if C is None else C.addmm_(R.T, X)
    return H, C


def run_module_with(module, states: torch.Tensor, weights: dict, batch_rows: int) -> torch.Tensor:
    """Output states of the module computed with the given {linear: weight Parameter} swapped in."""
    with swapped_weights(weights):
        return run_module(module, states, batch_rows)[0]


def hessian_of(states: torch.Tensor, batch_rows: int, device, ref_states: torch.Tensor | None = None):
    """X^T X of the states themselves (the head's input); with ref_states also C = X_ref^T X: returns (H, C)."""
    H = C = None
    for a in range(0, states.shape[0], batch_rows):
        X = states[a:a + batch_rows].reshape(-1, states.shape[-1]).to(device, torch.float32)
        H = X.T @ X if H is None else H.addmm_(X.T, X)
        if ref_states is not None:
            R = ref_states[a:a + batch_rows].reshape(-1, states.shape[-1]).to(device, torch.float32)
            C = R.T @ X if C is None else C.addmm_(R.T, X)
    return H if ref_states is None else (H, C)


def linear_weight(lin: ExLlamaV2Linear) -> torch.Tensor:
    """The unquantized (out, in) weight in fp32."""
    if lin.q_handle is not None:
        raise ValueError(f"{lin.key}: the input model is already quantized; convert from an unquantized model")
    return lin.weight.data.to(torch.float32)


def substitute_weight(lin: ExLlamaV2Linear, w: torch.Tensor) -> None:
    """Make lin compute with the (out, in) weight w (the dequantized result) from now on."""
    lin.weight = torch.nn.Parameter(w.to(lin.weight.device, lin.weight.dtype), requires_grad=False)
