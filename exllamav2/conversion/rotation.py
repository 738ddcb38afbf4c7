"""Rotating the residual stream before quantization (the offline rotation of QuaRot / SpinQuant).

For a pre-norm transformer with RMSNorm, an orthogonal Q applied to the residual stream (h -> h Q) gives an exactly
equivalent model once each norm's weight g is folded into the linears that read it:
    embedding E -> E Q;  q/k/v/gate/up W -> W diag(g) Q;  o/down W -> Q^T W (and their bias b -> b Q);
    head W -> W diag(g_final) Q;  every such norm weight -> 1.
RMSNorm commutes with Q (it only divides by the vector's norm), so every logit is unchanged. What changes is how
the weights look to a quantizer: a random rotation spreads each input feature's weight over all of them, so the
matrices lose their outlier columns and, for a checkpoint that was itself quantized (a GGUF), the source grid that
requantization would otherwise collide with. Measured on SmolLM2-135M (whole-model GPTQ, perplexity on two texts
unlike the calibration text; bench/quant_diagnosis.py): 4-bit g128 +43.1% / +40.3% -> +14.8% / +19.3%, 4-bit g32
+26.7% / +18.8% -> +14.6% / +12.6%; at 6 bits it did not help (+0.80% / +0.72% -> +1.42% / +0.94%).

The rotated model is written as an HF folder in the job's working folder and the conversion proceeds from it. The
converted model computes the same function, but its residual stream (what interventions read and steer, and what
LoRA adapters for the original model expect) is in rotated coordinates; the matrix is saved beside the model.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .compile import copy_model_files

ROTATION_FILE = "residual_rotation.safetensors"   # in a subfolder of the output, so it is not read as model weights
ROTATION_DIR = "residual_rotation"


def rotation_unsupported(config) -> str | None:
    """Why the residual stream of this model cannot be rotated exactly, or None when it can."""
    a = config.arch.lm
    why = []
    if a.norm != "rmsnorm" or a.norm_bias:
        why.append("its norms are LayerNorms (they subtract the mean, which does not commute with a rotation)")
    if a.keys.get("norm_1_post") or a.keys.get("norm_2_post"):
        why.append("it normalizes the attention/MLP outputs before the residual add")
    if a.norm_constant_bias:
        why.append("its norm weights carry a constant offset")
    if a.keymap or a.orig_weights_transposed:
        why.append("its tensors are renamed or transposed at load")
    if a.keys.get("learned_pos_emb") or a.is_moe or a.parallel_decoder_blocks:
        why.append("it has learned position embeddings, experts or parallel blocks")
    if a.keys.get("fused_qkv") or a.keys.get("fused_mlp_12"):
        why.append("it stores fused projections")
    return "; ".join(why) or None


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal (n, n) matrix in fp32, the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).to(torch.float32)


def _fp16_or_fp32(t: torch.Tensor) -> torch.Tensor:
    """fp16 when it holds the values (rounding 2^-11, an eighth of bf16's), fp32 otherwise."""
    h = t.to(torch.float16)
    return h if torch.isfinite(h).all() else t.contiguous()


def rotate_model_folder(config, out_dir: str, seed: int = 0, progress: bool = True,
                        fp32: bool = False) -> torch.Tensor:
    """Write the rotated equivalent of config's model to out_dir as an HF folder (one safetensors file per layer,
    with its index; config and tokenizer files copied, tie_word_embeddings off); returns the rotation."""
    reason = rotation_unsupported(config)
    if reason is not None:
        raise ValueError(f"{config.model_dir}: the residual stream cannot be rotated: {reason}")
    a = config.arch.lm
    k = a.keys
    fmap = config.tensor_file_map
    get = lambda name: fmap[name].get_tensor(name, device="cpu").to(torch.float32)  # noqa: E731
    Q = random_orthogonal(config.hidden_size, seed)
    _storage = (lambda t: t.contiguous()) if fp32 else _fp16_or_fp32
    os.makedirs(out_dir, exist_ok=True)
    done: set[str] = set()
    n_files = config.num_hidden_layers + 2
    weight_map: dict[str, str] = {}

    def write(tensors: dict[str, torch.Tensor], index: int) -> None:
        name = f"model-{index + 1:05d}-of-{n_files:05d}.safetensors"
        save_file({n: t.contiguous() for n, t in tensors.items()}, os.path.join(out_dir, name))
        weight_map.update(dict.fromkeys(tensors, name))

    def take(name: str) -> torch.Tensor:
        if name not in fmap:
            raise KeyError(f"{config.model_dir}: tensor {name} not found while rotating the model")
        done.add(name)
        return get(name)

    embed_name = k["embed_tokens"] + ".weight"
    head_name = k["lm_head"] + ".weight"
    n_layers = config.num_hidden_layers
    with tqdm(total=n_layers + 2, desc="Rotating", unit="part", disable=not progress) as bar:
        E = take(embed_name)
        write({embed_name: _storage(E @ Q)}, 0)
        bar.update(1)
        for i in range(n_layers):
            p = f"{k['layers']}.{i}"
            out: dict[str, torch.Tensor] = {}
            for norm, readers in ((k["norm_1"], (k["attn_q"], k["attn_k"], k["attn_v"])),
                                  (k["norm_2"], (k["mlp_gate"], k["mlp_up"]) if a.mlp_gate else (k["mlp_up"],))):
                g = take(p + norm + ".weight")
                for r in readers:
                    out[p + r + ".weight"] = _storage((take(p + r + ".weight") * g) @ Q)
                out[p + norm + ".weight"] = torch.ones_like(g).to(torch.float16)
            for w in (k["attn_o"], k["mlp_down"]):
                out[p + w + ".weight"] = _storage(Q.T @ take(p + w + ".weight"))
                if p + w + ".bias" in fmap:
                    out[p + w + ".bias"] = _storage(take(p + w + ".bias") @ Q)
            prefix = p + "."
            for name in fmap:  # q/k/v/gate/up biases, q/k norms: untouched by the rotation
                if name.startswith(prefix) and name not in done and name not in out:
                    out[name] = fmap[name].get_tensor(name, device="cpu")
                    done.add(name)
            write(out, i + 1)
            bar.update(1)
        g = take(k["norm"] + ".weight")
        head = take(head_name) if head_name in fmap else E
        tail = {k["norm"] + ".weight": torch.ones_like(g).to(torch.float16), head_name: _storage((head * g) @ Q)}
        if k["lm_head"] + ".bias" in fmap:
            tail[k["lm_head"] + ".bias"] = fmap[k["lm_head"] + ".bias"].get_tensor(k["lm_head"] + ".bias", device="cpu")
            done.add(k["lm_head"] + ".bias")
        write(tail, n_files - 1)
        bar.update(1)
    left = sorted(set(fmap) - done)
    if left:
        raise ValueError(f"{config.model_dir}: cannot rotate the model: tensor {left[0]} (and {len(left) - 1} more) "
                         "is not part of the attention/MLP/norm layout the rotation knows")
    copy_model_files(config.model_dir, out_dir)
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(config.model_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg["tie_word_embeddings"] = False
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return Q


def save_rotation(Q: torch.Tensor, out_dir: str) -> str:
    """Saves Q beside a converted model; returns its path relative to out_dir."""
    os.makedirs(os.path.join(out_dir, ROTATION_DIR), exist_ok=True)
    rel = os.path.join(ROTATION_DIR, ROTATION_FILE)
    save_file({"rotation": Q.contiguous()}, os.path.join(out_dir, rel))
    return rel
