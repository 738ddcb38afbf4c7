"""`convert-gguf` output loads in this engine and in HF transformers with equal logits, tokenizer included."""

import os
import subprocess
import sys

import pytest
import torch

from exllamav2 import ExLlamaV2, ExLlamaV2Config, ExLlamaV2Tokenizer


@pytest.fixture(scope="module")
def converted(smollm2_gguf, tmp_path_factory):
    from exllamav2.gguf import convert_gguf_to_hf
    out = tmp_path_factory.mktemp("smollm2_hf")
    convert_gguf_to_hf(smollm2_gguf, str(out), dtype=torch.bfloat16, progress=False)
    return str(out)


def test_converted_folder_both_engines(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    for f in ("config.json", "generation_config.json", "tokenizer.json", "model.safetensors"):
        assert os.path.exists(os.path.join(converted, f)), f
    cfg = ExLlamaV2Config(converted)
    cfg.dtype = "float32"
    model = ExLlamaV2(cfg)
    model.load()
    tok = ExLlamaV2Tokenizer(cfg)
    hf_tok = AutoTokenizer.from_pretrained(converted)
    text = "The quick brown fox — naïve café, 東京, 🦊 — def f(x): return x**2"
    ids = tok.encode(text)
    assert ids[0].tolist() == hf_tok(text, add_special_tokens=False)["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(ids).logits
    out = model.forward(ids)
    # fp32 on both sides, real-model logits (max ~35): bound relative to their size, 1e-4 x max(1, max |ref|)
    assert (out - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())


def test_convert_gguf_cli(smollm2_gguf, tmp_path):
    from exllamav2.gguf import GGUFError  # noqa: F401
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 20)
    r = subprocess.run([sys.executable, "-m", "exllamav2", "convert-gguf", str(bad), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "bad.gguf" in (r.stderr + r.stdout) and "Traceback" not in r.stderr
