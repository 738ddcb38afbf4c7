"""Whole models on the `triton` backend's linear kernels (under TRITON_INTERPRET=1, in fp16):
- a tiny EXL2 / GPTQ model generates the same greedy tokens as on the `torch` backend;
- loading with the backend pinned keeps only the packed weights: the tensors every quantized linear's kernel reads
  (and any dense copy it holds) add up to at most 1.05x the file's bytes for that weight, and no dense copy exists
  (the same walk over the torch backend's kernels after a forward finds its dense copies, so the check can fail).
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ops  # noqa: E402
from exllamav2.linear import ExLlamaV2Linear  # noqa: E402
from test_backends import _quantized_folder  # noqa: E402
from test_gguf_support import write_tiny_gguf  # noqa: E402

H = torch.float16


@pytest.fixture(scope="module")
def tiny_dense_1layer(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, attention_bias=True)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.06) if p.dim() > 1 else p.normal_(1.0, 0.05)
    path = tmp_path_factory.mktemp("dense1")
    m.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def _load(path):
    cfg = ExLlamaV2Config(path)
    cfg.dtype = H
    cfg.max_seq_len = 64
    m = ExLlamaV2(cfg)
    m.load()
    return m


def _greedy(model, prompt, new_tokens):
    cache = ExLlamaV2Cache(model, max_seq_len=64)
    ids = prompt
    logits = model.forward(ids, cache, last_id_only=True)[:, -1]
    out, steps = [], []
    for _ in range(new_tokens):
        steps.append(logits.float())
        tok = logits.argmax(-1, keepdim=True)
        out.append(tok)
        logits = model.forward(tok, cache)[:, -1]
    return torch.cat(out, 1), torch.stack(steps, 1)


def _linears(model):
    for module in model.modules:
        for v in vars(module).values():
            if isinstance(v, ExLlamaV2Linear):
                yield v


@pytest.mark.parametrize("fmt", ["exl2", "gptq"])
def test_tiny_model_generates_as_on_torch(fmt, tiny_dense_1layer, tmp_path, monkeypatch):
    path = _quantized_folder(tiny_dense_1layer, tmp_path / fmt, fmt)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    model = _load(path)
    prompt = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(3))
    with ops.use_backend("torch"):
        ref_tokens, ref_logits = _greedy(model, prompt, 5)
    ops.set_backend(None)  # triton first: the linears take the Triton kernels, other ops fall through
    try:
        tokens, logits = _greedy(model, prompt, 5)
        kinds = {type(p.kernel(H)).__name__ for p in _linears(model) if p.is_quant()}
    finally:
        ops.set_backend(None)
    assert kinds == {"Exl2Kernel" if fmt == "exl2" else "GptqKernel"}
    assert torch.equal(tokens, ref_tokens)
    span = ref_logits.abs().max().item()
    assert (logits - ref_logits).abs().max().item() <= 0.01 * span


def _file_bytes(path, key):
    from safetensors import safe_open
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return sum(f.get_tensor(n).numel() * f.get_tensor(n).element_size() for n in f.keys() if n.startswith(key + "."))


def _resident(kernel, q) -> tuple[int, list[torch.Tensor]]:
    """Bytes of the distinct tensors the kernel reads or keeps for weight q (a dense copy included)."""
    ts = list(kernel.resident_tensors()) if hasattr(kernel, "resident_tensors") else []
    ts += [t for t in (getattr(q, "_dense", None), getattr(kernel, "weight", None)) if t is not None]
    if getattr(q, "packed", None) is not None:
        ts += [q.packed]
    seen, total = set(), 0
    for t in ts:
        if isinstance(t, torch.Tensor):
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
        else:
            total += t.nbytes()
    return total, ts


def _dense_copies(ts, q):
    return [t for t in ts if isinstance(t, torch.Tensor) and t.is_floating_point()
            and sorted(t.shape) == sorted((q.in_features, q.out_features))]


@pytest.mark.parametrize("fmt", ["exl2", "gptq", "gguf"])
def test_resident_weights_are_the_packed_weights(fmt, tiny_dense_1layer, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if fmt == "gguf":
        path = write_tiny_gguf(str(tmp_path / "q4.gguf"), qtype="Q4_0", hidden=128, ffn=256, vocab=96, layers=1)
    else:
        path = _quantized_folder(tiny_dense_1layer, tmp_path / fmt, fmt)
    with ops.use_backend("triton"):
        model = _load(path)
        checked, total_res, total_file = 0, 0, 0
        for lin in _linears(model):
            if not lin.is_quant():
                continue
            q = lin.q_handle
            group = next((g for g in lin.fused_in if g.kernel(H) is not False), None)
            if group is not None:
                if lin is not group.parts[0]:
                    continue
                kernel, q = group.kernel(H), group._fused[2]
            else:
                kernel = lin.kernel(H)
            assert kernel.backend == "triton", lin.key
            res, ts = _resident(kernel, q)
            file = q.file_bytes() if fmt == "gguf" else _file_bytes(path, lin.key)
            assert not _dense_copies(ts, q), f"{lin.key}: a dense copy is resident"
            assert res <= 1.05 * file, f"{lin.key}: {res} resident bytes for {file} in the file"
            checked += 1
            total_res += res
            total_file += file
        assert checked >= (2 if fmt == "gguf" else 7)
        assert total_res <= 1.05 * total_file

    if fmt == "exl2":
        # the same walk finds the torch backend's dense copy once it has run
        lin = model.modules[1].q_proj
        with ops.use_backend("torch"):
            k = lin.kernel(H)
            k(torch.zeros(1, lin.in_features, dtype=H))
            res, ts = _resident(k, lin.q_handle)
        assert _dense_copies(ts, lin.q_handle) and res > 1.05 * _file_bytes(path, lin.key)
