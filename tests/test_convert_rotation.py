"""Rotating the residual stream before quantization (convert --rotate): the rotated folder is the same model to HF
transformers, the converter refuses it where it would not be exact, and the converted model records its rotation
(and refuses LoRA adapters made for the unrotated model)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, StableLmConfig, StableLmForCausalLM

from exllamav2 import ExLlamaV2Config
from exllamav2.conversion import ConvertSettings, convert_exl2
from exllamav2.conversion.converter import Converter
from exllamav2.conversion.rotation import random_orthogonal, rotate_model_folder, rotation_unsupported
from exllamav2.lora import LoraError
from parity import make_tiny, save_hf_model
from test_convert_common import LENGTH, ROWS, held_out_ids, hf_logits, load_ours, make_tiny_llama, rel_error


def test_random_orthogonal():
    Q = random_orthogonal(48, 3)
    torch.testing.assert_close(Q @ Q.T, torch.eye(48), atol=1e-5, rtol=0)
    assert Q.equal(random_orthogonal(48, 3)) and not Q.equal(random_orthogonal(48, 4))


@pytest.mark.parametrize("tied,bias", [(True, False), (False, True)])
def test_rotated_folder_is_the_same_model(tmp_path, tied, bias):
    if bias:  # q/k/v/o and gate/up/down biases: o/down biases live in the residual stream and rotate with it
        cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True)
        src = save_hf_model(make_tiny(LlamaForCausalLM, cfg, init_scale=0.05), tmp_path / "src")
        ids = torch.randint(0, 512, (1, 40), generator=torch.Generator().manual_seed(0))
    else:
        src = make_tiny_llama(tmp_path / "src", tied=tied)
        ids = held_out_ids(src)
    Q = rotate_model_folder(ExLlamaV2Config(src), str(tmp_path / "rot"), seed=1, progress=False, fp32=True)
    a, b = hf_logits(src, ids), hf_logits(str(tmp_path / "rot"), ids)
    assert float((a - b).norm() / a.norm()) < 1e-5
    with open(tmp_path / "rot" / "config.json") as f:
        assert json.load(f)["tie_word_embeddings"] is False
    t = {}
    for name in os.listdir(tmp_path / "rot"):
        if name.endswith(".safetensors"):
            t.update(load_file(str(tmp_path / "rot" / name)))
    assert t["model.layers.0.input_layernorm.weight"].eq(1).all() and t["model.norm.weight"].eq(1).all()
    E = load_file(str(tmp_path / "src" / "model.safetensors"))["model.embed_tokens.weight"]
    torch.testing.assert_close(t["model.embed_tokens.weight"], E @ Q, atol=1e-5, rtol=1e-5)
    # stored in fp16 by default: the same model to within fp16 rounding
    rotate_model_folder(ExLlamaV2Config(src), str(tmp_path / "rot16"), seed=1, progress=False)
    assert float((a - hf_logits(str(tmp_path / "rot16"), ids)).norm() / a.norm()) < 3e-3


def test_layernorm_models_are_not_rotated(tmp_path):
    cfg = StableLmConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4)
    src = save_hf_model(make_tiny(StableLmForCausalLM, cfg), tmp_path / "stablelm")
    config = ExLlamaV2Config(src)
    assert "LayerNorm" in rotation_unsupported(config)
    with pytest.raises(ValueError, match="cannot be rotated"):
        rotate_model_folder(config, str(tmp_path / "x"), progress=False)
    with pytest.raises(ValueError, match="--rotate is not possible for StableLmForCausalLM"):
        Converter(ConvertSettings(src, str(tmp_path / "o"), bits=4.0, rotate=True), progress=False)
    assert Converter(ConvertSettings(src, str(tmp_path / "o2"), bits=4.0), progress=False).rotate is False


def test_setting_and_flag(tmp_path):
    import argparse
    from exllamav2.commands import convert as convert_cmd
    parser = argparse.ArgumentParser()
    convert_cmd.add_parser(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["convert", "-i", "a", "-o", "b"]).rotate is False
    assert parser.parse_args(["convert", "-i", "a", "-o", "b", "--rotate"]).rotate is True
    src = make_tiny_llama(tmp_path / "src")
    assert Converter(ConvertSettings(src, str(tmp_path / "o1")), progress=False).rotate is False
    assert not os.path.exists(tmp_path / "o1" / ".convert_job" / "rotated")
    assert Converter(ConvertSettings(src, str(tmp_path / "o2"), rotate=True), progress=False).rotate is True
    assert os.path.isfile(tmp_path / "o2" / ".convert_job" / "rotated" / "model.safetensors.index.json")
    assert ConvertSettings(src, "x", rotate=True).job_settings() != ConvertSettings(src, "x").job_settings()


def test_rotated_conversion(tmp_path, capsys):
    src = make_tiny_llama(tmp_path / "src", tied=True)
    ids = held_out_ids(src)
    ref = hf_logits(src, ids)
    out = str(tmp_path / "q")
    summary = convert_exl2(ConvertSettings(src, out, bits=4.0, head_bits=6, rows=ROWS, length=LENGTH, rotate=True),
                           progress=False)
    assert abs(summary["bpw"] - 4.0) <= 0.05
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    rot = cfg["quantization_config"]["residual_rotation"]
    assert cfg["tie_word_embeddings"] is False and rot["seed"] == 0
    Q = load_file(os.path.join(out, rot["file"]))["rotation"]
    torch.testing.assert_close(Q @ Q.T, torch.eye(Q.shape[0]), atol=1e-5, rtol=0)
    model = load_ours(out)
    assert model.config.residual_rotation == rot and ExLlamaV2Config(src).residual_rotation is None
    assert rel_error(model, ids, ref) < 0.7  # test_convert.py's bound at 4.0 for this model
    E = load_file(str(tmp_path / "src" / "model.safetensors"))["model.embed_tokens.weight"]
    emb = load_file(os.path.join(out, "output.safetensors"))["model.embed_tokens.weight"].float()
    torch.testing.assert_close(emb, E @ Q, atol=2e-3, rtol=2e-3)
    from exllamav2.cli import main as cli_main
    assert cli_main(["info", "-m", out, "--no-modules"]) == 0
    assert "residual stream rotated" in capsys.readouterr().out
    lora_dir = tmp_path / "lora"
    lora_dir.mkdir()
    (lora_dir / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 4, "target_modules": ["q_proj"]}))
    from exllamav2.lora import ExLlamaV2Lora
    with pytest.raises(LoraError, match="rotated residual stream"):
        ExLlamaV2Lora(model, str(lora_dir))
