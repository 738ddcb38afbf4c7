"""Parallel-decoder architectures (GPT-NeoX both ways, GPT-J, Phi, Cohere, Cohere2) against HF transformers through
the shared parity runner, plus the parallel decoder's intermediates, residual sum, LoRA reach and Intervention."""

import pytest
import torch
from transformers import (Cohere2Config, Cohere2ForCausalLM, CohereConfig, CohereForCausalLM, GPTJConfig,
                          GPTJForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM, PhiConfig, PhiForCausalLM)

from exllamav2 import ExLlamaV2Cache
from exllamav2.attn_params import Params
from exllamav2.module import Intervention
from exllamav2.parallel_decoder import ExLlamaV2ParallelDecoder
from parity import ParityRunner, default_hf_names, make_tiny, save_hf_model

COMMON = dict(vocab_size=131, hidden_size=48, intermediate_size=88, num_hidden_layers=3, num_attention_heads=6,
              max_position_embeddings=128)

CASES = {
    "neox_parallel": (GPTNeoXForCausalLM, GPTNeoXConfig, dict(rotary_pct=0.5, use_parallel_residual=True)),
    "neox_sequential": (GPTNeoXForCausalLM, GPTNeoXConfig, dict(rotary_pct=0.25, use_parallel_residual=False)),
    "gptj": (GPTJForCausalLM, GPTJConfig, dict(n_embd=48, n_layer=3, n_head=6, n_inner=88, rotary_dim=4,
                                               n_positions=128, vocab_size=131)),
    "phi": (PhiForCausalLM, PhiConfig, dict(num_key_value_heads=2, partial_rotary_factor=0.5)),
    "phi_qk_layernorm": (PhiForCausalLM, PhiConfig, dict(num_key_value_heads=3, partial_rotary_factor=0.75,
                                                         qk_layernorm=True)),
    "cohere": (CohereForCausalLM, CohereConfig, dict(num_key_value_heads=2, logit_scale=0.5)),
    "cohere_qk_norm": (CohereForCausalLM, CohereConfig, dict(num_key_value_heads=2, use_qk_norm=True, logit_scale=0.25)),
    "cohere2": (Cohere2ForCausalLM, Cohere2Config, dict(num_key_value_heads=2, sliding_window=8, sliding_window_pattern=2,
                                                        logit_scale=0.5)),
}


def _config(cfg_cls, extra):
    if cfg_cls is GPTJConfig:
        return cfg_cls(**extra)
    return cfg_cls(**{**COMMON, **extra})


# variants whose features the other cases already cover run with the slow set (`pytest -m slow`)
SLOW_CASES: set = set()  # every case runs by default


@pytest.fixture(scope="module", params=[pytest.param(n, marks=pytest.mark.slow) if n in SLOW_CASES else n
                                        for n in sorted(CASES)])
def case(request, tmp_path_factory):
    model_cls, cfg_cls, extra = CASES[request.param]
    hf = make_tiny(model_cls, _config(cfg_cls, extra), seed=sum(map(ord, request.param)), init_scale=0.08)
    path = save_hf_model(hf, tmp_path_factory.mktemp(request.param))
    runner = ParityRunner(path, hf)
    return request.param, runner, runner.load()


def parallel_hf_names(module) -> dict:
    """Our parallel decoder's intermediates -> (HF module name, "in"/"out"). HF's attention and MLP module names
    are the parents of the output projections."""
    if not isinstance(module, ExLlamaV2ParallelDecoder):
        return default_hf_names(module, module.model)
    o, down = module.attn.o_proj.key, module.mlp.down_proj.key
    return {"post_norm": (module.input_layernorm.key, "out"),
            "attn_output": (o, "in"),
            "pre_down": (down, "in"),
            "hidden_states_attn": (o.rsplit(".", 1)[0], "out"),
            "hidden_states_mlp": (down.rsplit(".", 1)[0], "out"),
            "hidden_states": (module.key, "out")}


def test_logits_prefill_and_cached_decode(case):
    _, runner, model = case
    runner.check_prefill_and_decode(model)


def test_padded_batch_equals_alone(case):
    case[1].check_padded_batch()


def test_chunked_prefill(case):
    case[1].check_chunked_prefill()


def test_bf16(case):
    case[1].check_bf16()


def test_intermediates(case):
    name, runner, model = case
    parallel = [m for m in model.modules if isinstance(m, ExLlamaV2ParallelDecoder)]
    assert bool(parallel) == (name != "neox_sequential")
    hf_modules = dict(runner.hf.named_modules())
    for m in parallel:  # every forward_interm key is matched to an HF tensor
        names = parallel_hf_names(m)
        assert set(names) == {"post_norm", "attn_output", "pre_down", "hidden_states_attn", "hidden_states_mlp",
                              "hidden_states"}
        assert all(h in hf_modules for h, _ in names.values()), names
    runner.check_intermediates(model, hf_names=parallel_hf_names)


def test_logits_have_spread(case):
    assert case[1].ref.std().item() > 0.05


def test_architecture_shape(case):
    name, runner, model = case
    if name == "cohere2":  # the pattern must mix both kinds, or NoPE on full layers would go untested
        assert set(model.config.layer_types) == {"sliding_attention", "full_attention"}
        assert [a.uses_rope() for a in (m.attn for m in model.modules if isinstance(m, ExLlamaV2ParallelDecoder))] == \
               [t == "sliding_attention" for t in model.config.layer_types]
    if name.startswith("neox"):
        layer = model.modules[1]
        assert layer.archparams.fused_qkv_altpack and layer.archparams.parallel_decoder_blocks == (name == "neox_parallel")


# ---------------------------------------------------------------- parallel decoder behaviour

@pytest.fixture(scope="module")
def neox(tmp_path_factory):
    model_cls, cfg_cls, extra = CASES["neox_parallel"]
    hf = make_tiny(model_cls, _config(cfg_cls, extra), seed=3, init_scale=0.08)
    path = save_hf_model(hf, tmp_path_factory.mktemp("neox_behaviour"))
    runner = ParityRunner(path, hf, decode_steps=1)
    return runner, runner.load()


def _run_to(model, ids, upto: int):
    """Hidden states entering module `upto`, computed module by module."""
    params = Params(1, ids.shape[1], 0)
    x = ids
    for m in model.modules[:upto]:
        x = m.forward(x, attn_params=params)
    return x, params


def test_forward_interm_sum_and_keys(neox):
    _, model = neox
    dec = model.modules[1]
    assert isinstance(dec, ExLlamaV2ParallelDecoder) and dec.kv_layer and dec.layer_idx == 0
    x, params = _run_to(model, neox[0].ids[:, :20], 1)
    r = dec.forward(x, attn_params=params, intermediates=True)
    assert set(r) == {"post_norm", "attn_output", "pre_down", "hidden_states_attn", "hidden_states_mlp", "hidden_states"}
    assert torch.equal(r["hidden_states"], x + r["hidden_states_attn"] + r["hidden_states_mlp"])
    assert torch.equal(dec.forward(x, attn_params=params), r["hidden_states"])
    assert r["pre_down"].shape[-1] == model.config.intermediate_size
    assert r["attn_output"].shape[-1] == model.config.num_attention_heads * model.config.head_dim


def test_modules_dict_sees_linears_and_norms(neox):
    _, model = neox
    dec = model.modules[1]
    for sub in (dec.input_layernorm, dec.mlp_layernorm, dec.attn.q_proj, dec.attn.k_proj, dec.attn.v_proj,
                dec.attn.o_proj, dec.mlp.up_proj, dec.mlp.down_proj):
        assert model.modules_dict[sub.key] is sub
    assert "gpt_neox.layers.0.input_layernorm" in model.modules_dict
    assert dec.numel() == sum(m.numel() for m in dec.submodules)
    assert dec.weight_footprint() > 0 and not dec.is_quant()


def test_lora_reaches_both_branches(neox):
    _, model = neox
    dec = model.modules[1]
    x, params = _run_to(model, neox[0].ids[:, :10], 1)
    base = dec.forward(x, attn_params=params, intermediates=True)
    lora = object()
    rank = 2
    g = torch.Generator().manual_seed(5)
    ab = {}
    for lin in (dec.attn.o_proj, dec.mlp.down_proj):
        ab[lin.key] = (torch.randn(lin.in_features, rank, generator=g) * 0.1,
                       torch.randn(rank, lin.out_features, generator=g) * 0.1)
        lin.lora_a_tensors[lora], lin.lora_b_tensors[lora] = ab[lin.key]
    try:
        out = dec.forward(x, attn_params=params, intermediates=True, loras=[lora])
    finally:
        for lin in (dec.attn.o_proj, dec.mlp.down_proj):
            del lin.lora_a_tensors[lora], lin.lora_b_tensors[lora]
    for branch, lin, inp in (("hidden_states_attn", dec.attn.o_proj, "attn_output"),
                             ("hidden_states_mlp", dec.mlp.down_proj, "pre_down")):
        torch.testing.assert_close(out[inp], base[inp])
        a, b = ab[lin.key]
        delta = out[branch] - base[branch]
        assert delta.abs().max() > 1e-3, branch
        torch.testing.assert_close(delta, (base[inp] @ a) @ b, atol=1e-5, rtol=1e-4)


def test_intervention_captures_and_steers(neox):
    runner, model = neox
    ids = runner.ids[:, :24]
    plain = model.forward(ids)
    i = 2
    inner = model.modules[i]
    captured = []

    def capture(h, *args, **kwargs):
        captured.append(h)  # no clone: the engine must not write into it afterwards
        return h

    model.modules[i] = Intervention(inner, post_forward=capture)
    try:
        assert model.modules[i].layer_idx == inner.layer_idx and model.modules[i].kv_layer
        cache = ExLlamaV2Cache(model, max_seq_len=runner.max_seq_len)
        logits = model.forward(ids, cache)
        model.forward(ids[:, -1:], cache)  # more work after the capture must not change it
    finally:
        model.modules[i] = inner
    assert torch.equal(logits, model.forward(ids))
    torch.testing.assert_close(logits, plain)
    expected, params = _run_to(model, ids, i + 1)
    assert len(captured) == 2 and torch.equal(captured[0], expected)

    steer = torch.zeros(model.config.hidden_size)
    steer[:8] = 0.5
    model.modules[i] = Intervention(inner, post_forward=lambda h, *a, **k: h + steer)
    try:
        steered = model.forward(ids)
    finally:
        model.modules[i] = inner
    x = expected + steer
    for m in model.modules[i + 1:]:
        x = m.forward(x, attn_params=params)
    torch.testing.assert_close(steered, x.float(), atol=1e-5, rtol=0)
    assert (steered - plain).abs().max() > 1e-3
