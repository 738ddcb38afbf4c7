"""How much the model's loss cares about each linear layer's output channels: the mean squared gradient of the
next-token loss with respect to each output, over calibration rows, with the unquantized model.

A quantization error D of a linear with inputs x changes its outputs by D x; to second order (Gauss-Newton, with the
diagonal of the output gradients' second moment) the loss grows by 1/2 sum_i G_i (D H D^T)_ii / tokens. Scoring the
candidate options with that, instead of the relative output error alone, lets the bit allocation see that, e.g., an
error in k_proj (read through the softmax) costs far more per weight than the same relative error in q_proj; with
relative errors alone it gave SmolLM2-135M's k_proj 2-3 bits at a 4.0 bpw target."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..ops.dispatch import use_backend


def output_gradient_moments(model, linears, ids: torch.Tensor, progress: bool = True) -> dict[str, torch.Tensor]:
    """{linear key: (out_features,) mean over tokens of (dLoss/dy_i)^2} for the loaded model over the rows of ids
    (rows, length); the loss is the mean next-token cross-entropy of each row."""
    sums = {lin.key: torch.zeros(lin.out_features, dtype=torch.float64) for lin in linears}
    originals = {}

    def accumulate(key: str, g: torch.Tensor) -> None:  # returns None: the gradient itself is left unchanged
        sums[key].add_(g.detach().double().pow(2).reshape(-1, g.shape[-1]).sum(0))

    def watch(lin):
        forward = lin.forward

        def forward_watched(x, *args, **kwargs):
            y = forward(x, *args, **kwargs)
            if torch.is_tensor(y) and y.requires_grad:
                y.register_hook(lambda g: accumulate(lin.key, g))
            return y

        originals[lin] = vars(lin).get("forward")
        lin.forward = forward_watched

    embedding = model.modules[0]
    embed_forward = embedding.forward
    originals[embedding] = vars(embedding).get("forward")
    for lin in linears:
        watch(lin)
    # nothing in the model requires grad; starting the graph at the embedding output makes every later output part of it
    embedding.forward = lambda *a, **k: embed_forward(*a, **k).detach().requires_grad_()
    tokens = 0
    try:
        # the torch reference ops: other backends' kernels (e.g. the cpu backend's rms_norm) have no autograd
        with use_backend("torch"), torch.inference_mode(False), torch.enable_grad():
            for r in tqdm(range(ids.shape[0]), desc="Sensitivity", unit="row", disable=not progress):
                row = ids[r:r + 1].to(embedding.device())
                logits = model.forward_chunk(row[:, :-1])["logits"]
                loss = F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), row[:, 1:].reshape(-1).to(logits.device))
                loss.backward()
                tokens += row.shape[1] - 1
    finally:
        for module, forward in originals.items():  # back to the class's method, or to what was set before
            if forward is None:
                del module.forward
            else:
                module.forward = forward
    # the loss is a per-row mean, so gradients carry 1/(tokens per row); rescale to per-token gradients
    per_row = ids.shape[1] - 1
    return {k: (v * per_row * per_row / tokens).float() for k, v in sums.items()}
