"""LoRA adapters in PEFT format against HF transformers + peft."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
from exllamav2.lora import ExLlamaV2Lora, LoraError
from parity import make_tiny, save_hf_model

import peft  # a test dependency

COMMON = dict(vocab_size=89, hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=64)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    hf = make_tiny(LlamaForCausalLM, LlamaConfig(**COMMON), seed=5, init_scale=0.1)
    base_dir = save_hf_model(hf, tmp_path_factory.mktemp("base"))
    adapters = {}
    for name, rs in (("plain", False), ("rslora", True)):
        torch.manual_seed(11 if rs else 12)
        lc = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=rs, init_lora_weights=False,
                             target_modules=["q_proj", "v_proj", "o_proj", "down_proj", "gate_proj"])
        pm = peft.get_peft_model(make_tiny(LlamaForCausalLM, LlamaConfig(**COMMON), seed=5, init_scale=0.1), lc).eval()
        d = tmp_path_factory.mktemp(name)
        pm.save_pretrained(str(d))
        adapters[name] = (str(d), pm)
    cfg = ExLlamaV2Config(base_dir)
    cfg.dtype = "float32"
    model = ExLlamaV2(cfg)
    model.load()
    return hf, model, adapters


def test_lora_matches_peft(setup):
    hf, model, adapters = setup
    ids = torch.randint(0, 89, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_ref = hf(ids).logits
    for name, (path, pm) in adapters.items():
        lora = ExLlamaV2Lora.from_directory(model, path)
        with torch.no_grad():
            ref = pm(ids).logits
        assert (ref - base_ref).abs().max() > 1e-2, "adapter must change the output"
        out = model.forward(ids, loras=[lora])
        assert (out - ref).abs().max().item() < 1e-4, name
        cache = ExLlamaV2Cache(model, max_seq_len=32)
        steps = [model.forward(ids[:, :15], cache, loras=[lora])] + [model.forward(ids[:, i:i + 1], cache, loras=[lora]) for i in range(15, 20)]
        assert (torch.cat(steps, 1) - ref).abs().max().item() < 1e-4
        # without the adapter in `loras` the base model is untouched; unload detaches it
        assert (model.forward(ids) - base_ref).abs().max().item() < 1e-4
        lora.unload()
        assert all(not m.lora_a_tensors for m in model.modules_dict.values() if hasattr(m, "lora_a_tensors"))


def test_lora_errors(setup, tmp_path):
    _, model, adapters = setup
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        ExLlamaV2Lora.from_directory(model, str(tmp_path))
    import shutil
    from safetensors.torch import save_file
    d = tmp_path / "bad"
    shutil.copytree(adapters["plain"][0], d)
    save_file({"base_model.model.model.layers.0.self_attn.nope.lora_A.weight": torch.zeros(4, 32),
               "base_model.model.model.layers.0.self_attn.nope.lora_B.weight": torch.zeros(32, 4)},
              str(d / "adapter_model.safetensors"))
    with pytest.raises(LoraError, match="matches no linear"):
        ExLlamaV2Lora.from_directory(model, str(d))
