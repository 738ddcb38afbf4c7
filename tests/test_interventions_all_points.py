"""Every point `point_names(model)` lists, on every supported architecture (tiny random HF models from the
parity tests' builders, fp32): a capture has the point's shape and the points relate as documented
(resid_mid = resid_pre + attn_out, resid_post = resid_mid + mlp_out); an edit lands at the point (a capture added
after it sees it), changes the logits, and its removal gives the exact logits of before. MoE points carry the
documented meanings (mlp.pre_down: each token's selected experts' activations in routing-rank order)."""

from __future__ import annotations

import importlib
import json

import pytest
import torch

from exllamav2 import ExLlamaV2, ExLlamaV2Config
from exllamav2.interventions import (BLOCK_POINTS, AddVector, InterventionHook, Zero, add_capture, add_edit,
                                     point_names, resolve, wrapped_slots)
from exllamav2.interventions.points import layer_blocks, raw
from exllamav2.moe_mlp import ExLlamaV2MoEMLP
from parity import make_tiny, save_hf_model


# ------------------------------------------------------------------ one tiny model per architecture string

def _from_cases(module: str, name: str):
    """An HF model built exactly as the parity test `module` builds its case `name`."""
    mod = importlib.import_module(module)
    if hasattr(mod, "_build"):
        return mod._build(name)
    case = mod.CASES[name]
    if module == "test_fused_tensors":
        return make_tiny(case[0], case[1], seed=sum(map(ord, name)), init_scale=0.08)
    model_cls, cfg_cls, extra = case
    cfg = mod._config(cfg_cls, extra) if hasattr(mod, "_config") else cfg_cls(**{**mod.COMMON, **extra})
    return make_tiny(model_cls, cfg, seed=sum(map(ord, name)), init_scale=0.08)


def _hf(module, name):
    return lambda path: save_hf_model(_from_cases(module, name), path)


def _yi(path):
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM
    mod = importlib.import_module("test_llama_parity")
    path = save_hf_model(make_tiny(LlamaForCausalLM, LlamaConfig(**mod.COMMON), seed=9, init_scale=0.08), path)
    st = f"{path}/model.safetensors"
    t = {k.replace(".input_layernorm.", ".ln1.").replace(".post_attention_layernorm.", ".ln2."): v
         for k, v in load_file(st).items()}
    save_file(t, st)
    with open(f"{path}/config.json") as f:
        cfg = json.load(f)
    cfg["architectures"] = ["YiForCausalLM"]
    with open(f"{path}/config.json", "w") as f:
        json.dump(cfg, f)
    return path


def _internlm2(path):
    from transformers import LlamaConfig, LlamaForCausalLM
    mod = importlib.import_module("test_more_arch_parity")
    hf = make_tiny(LlamaForCausalLM, LlamaConfig(**{**mod.COMMON, "attention_bias": True}), seed=11, init_scale=0.08)
    return mod.to_internlm2(hf, str(path), True)


# case id -> (architecture string, builder(path) -> model folder)
CASES = {
    "llama": ("LlamaForCausalLM", _hf("test_llama_parity", "llama")),
    "mistral": ("MistralForCausalLM", _hf("test_llama_parity", "mistral_swa")),
    "qwen2": ("Qwen2ForCausalLM", _hf("test_llama_parity", "qwen2")),
    "qwen3": ("Qwen3ForCausalLM", _hf("test_llama_parity", "qwen3")),
    "yi": ("YiForCausalLM", _yi),
    "internlm2": ("InternLM2ForCausalLM", _internlm2),
    "gemma": ("GemmaForCausalLM", _hf("test_more_arch_parity", "gemma")),
    "gemma2": ("Gemma2ForCausalLM", _hf("test_more_arch_parity", "gemma2")),
    "gemma3": ("Gemma3ForCausalLM", _hf("test_more_arch_parity", "gemma3")),
    "gemma3_mm": ("Gemma3ForConditionalGeneration", _hf("test_more_arch_parity", "gemma3_mm")),
    "starcoder2": ("Starcoder2ForCausalLM", _hf("test_more_arch_parity", "starcoder2")),
    "granite": ("GraniteForCausalLM", _hf("test_more_arch_parity", "granite")),
    "stablelm": ("StableLmForCausalLM", _hf("test_more_arch_parity", "stablelm")),
    "stablelm_parallel": ("StableLmForCausalLM", _hf("test_more_arch_parity", "stablelm_parallel")),
    "olmo2": ("Olmo2ForCausalLM", _hf("test_more_arch_parity", "olmo2")),
    "ministral": ("MinistralForCausalLM", _hf("test_more_arch_parity", "ministral")),
    "helium": ("HeliumForCausalLM", _hf("test_more_arch_parity", "helium")),
    "ernie4_5": ("Ernie4_5ForCausalLM", _hf("test_more_arch_parity", "ernie4_5")),
    "seed_oss": ("SeedOssForCausalLM", _hf("test_more_arch_parity", "seed_oss")),
    "mixtral": ("MixtralForCausalLM", _hf("test_moe", "mixtral")),
    "qwen2_moe": ("Qwen2MoeForCausalLM", _hf("test_moe", "qwen2_moe")),
    "qwen3_moe": ("Qwen3MoeForCausalLM", _hf("test_moe", "qwen3_moe")),
    "neox_parallel": ("GPTNeoXForCausalLM", _hf("test_parallel_parity", "neox_parallel")),
    "neox_sequential": ("GPTNeoXForCausalLM", _hf("test_parallel_parity", "neox_sequential")),
    "gptj": ("GPTJForCausalLM", _hf("test_parallel_parity", "gptj")),
    "phi": ("PhiForCausalLM", _hf("test_parallel_parity", "phi")),
    "cohere": ("CohereForCausalLM", _hf("test_parallel_parity", "cohere")),
    "cohere2": ("Cohere2ForCausalLM", _hf("test_parallel_parity", "cohere2")),
    "phi3": ("Phi3ForCausalLM", _hf("test_fused_tensors", "phi3")),
    "gpt2": ("GPT2LMHeadModel", _hf("test_fused_tensors", "gpt2")),
}

PARALLEL = {"stablelm_parallel", "neox_parallel", "gptj", "phi", "cohere", "cohere2"}
MOE = {"mixtral", "qwen2_moe", "qwen3_moe"}
B, S = 2, 5


def test_every_supported_architecture_has_a_case():
    from exllamav2.architecture import supported_architectures
    missing = set(supported_architectures()) - {arch for arch, _ in CASES.values()}
    assert not missing, f"architectures without an all-points intervention case: {sorted(missing)}"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: a second thread only adds synchronisation (milliseconds per op on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


_LOADED: dict = {}  # tiny models: kept for the MoE tests, which parametrize this fixture again


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    if request.param not in _LOADED:
        _LOADED[request.param] = _load(request.param, tmp_path_factory)
    return _LOADED[request.param]


def _load(name, tmp_path_factory):
    arch, build = CASES[name]
    cfg = ExLlamaV2Config(build(tmp_path_factory.mktemp(name)))
    assert cfg.architecture == arch
    cfg.dtype = "float32"
    cfg.max_seq_len = 32
    cfg.max_batch_size = B
    model = ExLlamaV2(cfg)
    model.load()
    ids = torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(len(name)))
    base = model.forward(ids)
    names = point_names(model)
    with add_capture(model, names) as cap:
        logits = model.forward(ids)
    assert torch.equal(logits, base), "capturing must not change the logits"
    acts = {n: cap[n].values for n in names}
    assert not wrapped_slots(model)
    return name, model, ids, base, acts


def _moe_at(model, layer: int):
    blk = layer_blocks(model)[layer]
    m = raw(model.modules[blk[-1]])
    return m if isinstance(m, ExLlamaV2MoEMLP) else None


def test_captures_have_point_shapes_and_relations(case):
    name, model, ids, base, acts = case
    cfg = model.config
    n_layers = cfg.num_hidden_layers
    blocks = layer_blocks(model)
    assert len(blocks) == n_layers
    assert [b[0] == "par" for b in blocks] == [name in PARALLEL] * n_layers
    names = point_names(model)
    assert names == ["embed"] + [f"blocks.{i}.{p}" for i in range(n_layers) for p in BLOCK_POINTS] + ["final_norm"]
    a = {}
    for n in names:
        p = resolve(model, n)
        v = acts[n]
        assert v.shape == (B * S, p.width), n
        assert torch.isfinite(v).all(), n
        a[n] = v.view(B, S, p.width)
    heads = cfg.num_attention_heads * cfg.head_dim
    for i in range(n_layers):
        pre = f"blocks.{i}."
        moe = _moe_at(model, i)
        assert resolve(model, pre + "attn.attn_output").width == heads
        interm = moe.top_k * moe.interm_features if moe is not None else cfg.intermediate_size
        assert resolve(model, pre + "mlp.pre_down").width == interm
        for p in BLOCK_POINTS:
            if p not in ("attn.attn_output", "mlp.pre_down"):
                assert resolve(model, pre + p).width == cfg.hidden_size
        # the branch outputs are what the branches add to the residual
        scale = a[pre + "resid_post"].abs().max().item() + 1.0
        torch.testing.assert_close(a[pre + "resid_mid"], a[pre + "resid_pre"] + a[pre + "attn_out"],
                                   atol=1e-5 * scale, rtol=0, msg=lambda m: f"{name} layer {i} resid_mid: {m}")
        torch.testing.assert_close(a[pre + "resid_post"], a[pre + "resid_mid"] + a[pre + "mlp_out"],
                                   atol=1e-5 * scale, rtol=0, msg=lambda m: f"{name} layer {i} resid_post: {m}")
        if i + 1 < n_layers:
            assert torch.equal(a[pre + "resid_post"], a[f"blocks.{i + 1}.resid_pre"])
    assert torch.equal(a["embed"], a["blocks.0.resid_pre"])


def test_every_point_edits_and_restores(case):
    name, model, ids, base, acts = case
    g = torch.Generator().manual_seed(1)
    for n in point_names(model):
        p = resolve(model, n)
        ref = acts[n]
        v = torch.randn(p.width, generator=g) * (ref.std().item() + 0.1)
        h = add_edit(model, n, AddVector(v))
        wrappers = wrapped_slots(model)
        assert wrappers and all(isinstance(w, InterventionHook) for _, w in wrappers)
        with add_capture(model, [n]) as cap:  # added after the edit: sees the edited tensor
            edited = model.forward(ids)
        h.remove()
        assert not wrapped_slots(model), n
        torch.testing.assert_close(cap[n].values, ref + v, atol=1e-5 * (ref.abs().max().item() + 1), rtol=0,
                                   msg=lambda m: f"{name} {n}: the edit is not at the point: {m}")
        assert (edited - base).abs().max().item() > 1e-4, f"{name} {n}: adding a vector did not change the logits"
        assert torch.equal(model.forward(ids), base), f"{name} {n}: logits differ after removal"


# ------------------------------------------------------------------ what the MoE points mean

def _moe_cases(case):
    name, model, ids, base, acts = case
    layers = [i for i in range(model.config.num_hidden_layers) if _moe_at(model, i) is not None]
    assert layers
    return name, model, ids, base, acts, layers


@pytest.mark.parametrize("case", sorted(MOE), indirect=True)
def test_moe_pre_down_is_selected_expert_activations_in_rank_order(case):
    name, model, ids, base, acts, layers = _moe_cases(case)
    for i in layers:
        moe = _moe_at(model, i)
        pre = f"blocks.{i}."
        x = acts[pre + "mlp.post_norm"]
        weights, experts = moe.route(x)
        assert (weights[:, :-1] >= weights[:, 1:]).all()  # slot j = the j-th largest router weight
        k, im = moe.top_k, moe.interm_features
        want = torch.zeros(x.shape[0], k * im)
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for j in range(k):
                e = experts[t, j].item()
                a = moe.act(moe.w1[e].forward(x[t:t + 1])) * moe.w3[e].forward(x[t:t + 1])
                want[t, j * im:(j + 1) * im] = a[0]
                out[t] += weights[t, j] * moe.w2[e].forward(a)[0]
        torch.testing.assert_close(acts[pre + "mlp.pre_down"], want, atol=1e-5, rtol=1e-5)
        if moe.shared_expert is not None:
            s = moe.shared_expert.forward(x)
            if moe.shared_gate is not None:
                s = torch.sigmoid(moe.shared_gate.forward(x)) * s
            out = out + s
        torch.testing.assert_close(acts[pre + "mlp_out"], out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", sorted(MOE), indirect=True)
def test_moe_pre_down_edit_feeds_the_down_projections(case):
    """Adding v to rank-0's slice of mlp.pre_down moves mlp_out by weight_0 * w2[expert_0](v) per token;
    zeroing mlp.pre_down leaves only the shared expert in mlp_out."""
    name, model, ids, base, acts, layers = _moe_cases(case)
    i = layers[0]
    moe = _moe_at(model, i)
    pre = f"blocks.{i}."
    x = acts[pre + "mlp.post_norm"]
    weights, experts = moe.route(x)
    im = moe.interm_features
    v = torch.randn(im, generator=torch.Generator().manual_seed(3))
    full = torch.zeros(moe.top_k * im)
    full[:im] = v
    with add_edit(model, pre + "mlp.pre_down", AddVector(full)), add_capture(model, [pre + "mlp_out"]) as cap:
        model.forward(ids)
    shift = torch.stack([weights[t, 0] * (moe.w2[experts[t, 0].item()].forward(v[None])[0])
                         for t in range(x.shape[0])])
    torch.testing.assert_close(cap[pre + "mlp_out"].values, acts[pre + "mlp_out"] + shift, atol=1e-5, rtol=1e-5)

    with add_edit(model, pre + "mlp.pre_down", Zero()), add_capture(model, [pre + "mlp_out"]) as cap:
        model.forward(ids)
    shared = torch.zeros_like(x)
    if moe.shared_expert is not None:
        shared = moe.shared_expert.forward(x)
        if moe.shared_gate is not None:
            shared = torch.sigmoid(moe.shared_gate.forward(x)) * shared
    torch.testing.assert_close(cap[pre + "mlp_out"].values, shared, atol=1e-5, rtol=1e-5)
    assert torch.equal(model.forward(ids), base)
    assert not wrapped_slots(model)


# ------------------------------------------------------------------ parallel blocks: each branch's own input

@pytest.mark.parametrize("case", sorted(PARALLEL), indirect=True)
def test_parallel_post_norm_edits_one_branch(case):
    """attn.post_norm / mlp.post_norm are the inputs of the attention / MLP branch: editing one leaves the other
    branch's output as it was, also where both branches read one shared norm (GPT-J, Phi, Cohere, StableLM)."""
    name, model, ids, base, acts = case
    d = model.config.hidden_size
    v = torch.randn(d, generator=torch.Generator().manual_seed(4))
    for edited, kept, moved in (("attn.post_norm", "mlp_out", "attn_out"), ("mlp.post_norm", "attn_out", "mlp_out")):
        pts = [f"blocks.1.{kept}", f"blocks.1.{moved}"]
        with add_edit(model, f"blocks.1.{edited}", AddVector(v)), add_capture(model, pts) as cap:
            model.forward(ids)
        torch.testing.assert_close(cap[pts[0]].values, acts[pts[0]], atol=1e-6, rtol=0)
        assert (cap[pts[1]].values - acts[pts[1]]).abs().max() > 1e-4
    assert torch.equal(model.forward(ids), base)
