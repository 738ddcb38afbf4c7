"""MoE: Mixtral, Qwen2-MoE and Qwen3-MoE against HF through the shared parity runner; routing with hand-set
router weights; expert calls do not scale with tokens; fused 3-D expert tensors load like per-expert ones."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from safetensors.torch import load_file, save_file

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
from exllamav2.linear import ExLlamaV2Linear
from exllamav2.moe_mlp import ExLlamaV2MoEMLP
from parity import ParityRunner, default_hf_names, make_tiny, save_hf_model

COMMON = dict(vocab_size=131, hidden_size=48, intermediate_size=40, num_hidden_layers=3, num_attention_heads=6,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=128, num_experts_per_tok=2)

CASES = {
    "mixtral": (tf.MixtralForCausalLM, tf.MixtralConfig, dict(num_local_experts=5)),
    "mixtral_swa": (tf.MixtralForCausalLM, tf.MixtralConfig, dict(num_local_experts=4, num_experts_per_tok=3, sliding_window=8)),
    # shared expert, unnormalised top-k, a dense layer from decoder_sparse_step and one from mlp_only_layers
    "qwen2_moe": (tf.Qwen2MoeForCausalLM, tf.Qwen2MoeConfig, dict(
        num_hidden_layers=4, num_experts=6, moe_intermediate_size=24, shared_expert_intermediate_size=36,
        decoder_sparse_step=2, mlp_only_layers=[3], norm_topk_prob=False)),
    "qwen3_moe": (tf.Qwen3MoeForCausalLM, tf.Qwen3MoeConfig, dict(
        num_experts=6, moe_intermediate_size=24, norm_topk_prob=True, head_dim=16)),
}


def _build(name):
    model_cls, cfg_cls, extra = CASES[name]
    return make_tiny(model_cls, cfg_cls(**{**COMMON, **extra}), seed=sum(map(ord, name)), init_scale=0.08)


def _hf_names(m):
    if m.name == "MoEMLP":
        return {"post_norm": (m.pre_layernorm.key, "out")}
    return default_hf_names(m, m.model)


# a variant of an architecture already covered: run with `pytest -m slow` (or RUN_SLOW=1)
SLOW: set = set()  # every case runs by default


@pytest.fixture(scope="module", params=[pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(CASES)])
def runner(request, tmp_path_factory):
    hf = _build(request.param)
    path = save_hf_model(hf, tmp_path_factory.mktemp(request.param))
    return ParityRunner(path, hf)


def test_logits_prefill_and_cached_decode(runner):
    runner.check_prefill_and_decode()


def test_padded_batch_equals_alone(runner):
    runner.check_padded_batch()


def test_chunked_prefill(runner):
    runner.check_chunked_prefill()


def test_bf16(runner):
    runner.check_bf16()


def test_intermediates(runner):
    runner.check_intermediates(hf_names=_hf_names)


def test_dense_and_sparse_layers_follow_config(tmp_path):
    hf = _build("qwen2_moe")
    model = ExLlamaV2(ExLlamaV2Config(save_hf_model(hf, tmp_path)))
    kinds = [type(m).__name__ for m in model.modules if getattr(m, "name", "") in ("MLP", "MoEMLP")]
    # decoder_sparse_step=2: layers 1 and 3 sparse, but 3 is in mlp_only_layers
    assert kinds == ["ExLlamaV2MLP", "ExLlamaV2MoEMLP", "ExLlamaV2MLP", "ExLlamaV2MLP"]


# ---------------------------------------------------------------- routing and batching

@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    hf = _build("mixtral")
    path = save_hf_model(hf, tmp_path_factory.mktemp("mixtral_routing"))
    cfg = ExLlamaV2Config(path)
    cfg.dtype = "float32"
    cfg.max_batch_size = 8
    model = ExLlamaV2(cfg)
    model.load()
    return path, model


def _moe_layers(model):
    return [m for m in model.modules if isinstance(m, ExLlamaV2MoEMLP)]


def test_forced_routing_gives_expected_output(mixtral):
    _, model = mixtral
    moe = _moe_layers(model)[0]
    E, H = moe.num_experts, moe.hidden_size
    saved = moe.gate.weight
    try:
        # router logit e = (normed x)[e]: tokens whose inputs peak on two channels pick those two experts
        w = torch.zeros(E, H)
        w[torch.arange(E), torch.arange(E)] = 1.0
        moe.gate.weight = torch.nn.Parameter(w, requires_grad=False)
        picks = [(0, 3), (4, 1), (2, 0), (3, 4), (1, 2)]
        x = torch.zeros(1, len(picks), H)
        for t, (a, b) in enumerate(picks):
            x[0, t, a], x[0, t, b] = 3.0, 2.0
        x[..., E:] = 0.1  # off-router channels: visible to the experts, not to the router
        out = moe.forward(x, intermediates=True)

        xn = moe.pre_layernorm.forward(x)[0]
        expected = x[0].clone()
        for t, (a, b) in enumerate(picks):
            pr = torch.softmax(torch.stack((xn[t, a], xn[t, b])), 0)  # renormalised top-2
            for e, p in zip((a, b), pr):
                h = F.silu(xn[t] @ moe.w1[e].weight.T) * (xn[t] @ moe.w3[e].weight.T)
                expected[t] += p * (h @ moe.w2[e].weight.T)
        torch.testing.assert_close(out["hidden_states"][0], expected, atol=1e-5, rtol=1e-5)
        # each expert got exactly the tokens that picked it, and only those rows
        for e in range(E):
            n = sum(e in p for p in picks)
            assert out[f"pre_down.{e}"].shape == (n, moe.interm_features)
    finally:
        moe.gate.weight = saved


def test_expert_calls_do_not_scale_with_tokens(mixtral, monkeypatch):
    _, model = mixtral
    experts = {id(m) for moe in _moe_layers(model) for m in moe.experts}
    calls = {"n": 0}
    orig = ExLlamaV2Linear.forward

    def counting(self, *args, **kwargs):
        if id(self) in experts:
            calls["n"] += 1
        return orig(self, *args, **kwargs)

    monkeypatch.setattr(ExLlamaV2Linear, "forward", counting)
    limit = 3 * len(experts) // 3  # at most one call per expert linear per forward
    g = torch.Generator().manual_seed(3)
    cache = ExLlamaV2Cache(model, batch_size=8, max_seq_len=64)
    model.forward(torch.randint(0, 131, (8, 24), generator=g), cache, preprocess_only=True)
    per_prefill = calls["n"]
    assert 0 < per_prefill <= limit, f"prefill of 192 tokens made {per_prefill} expert calls (limit {limit})"
    tok = torch.randint(0, 131, (8, 1), generator=g)
    for _ in range(3):
        calls["n"] = 0
        logits = model.forward(tok, cache)
        assert 0 < calls["n"] <= limit, f"batch-of-8 decode step made {calls['n']} expert calls (limit {limit})"
        tok = logits[:, -1:].argmax(-1)
    # 8 tokens x top-2 x 3 linears x 3 layers would be 144 calls in a per-token loop
    assert limit < 8 * 2 * 3 * len(_moe_layers(model))


def test_fused_3d_expert_tensors_load(mixtral, tmp_path):
    path, model = mixtral
    tensors = load_file(os.path.join(path, "model.safetensors"))
    cfg = json.load(open(os.path.join(path, "config.json")))
    fused = {}
    for name, t in tensors.items():
        if ".block_sparse_moe.experts." not in name:
            fused[name] = t
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}.block_sparse_moe.experts"
        E = cfg["num_local_experts"]
        gu = torch.stack([torch.cat((tensors[f"{p}.{e}.w1.weight"], tensors[f"{p}.{e}.w3.weight"])) for e in range(E)])
        fused[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = gu
        fused[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack([tensors[f"{p}.{e}.w2.weight"] for e in range(E)])
    save_file(fused, str(tmp_path / "model.safetensors"))
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    c2 = ExLlamaV2Config(str(tmp_path))
    c2.dtype = "float32"
    m2 = ExLlamaV2(c2)
    m2.load()
    ids = torch.randint(0, 131, (2, 12), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(m2.forward(ids), model.forward(ids), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- the static (sync-free) routing path


@pytest.fixture()
def static_routing():
    """Set ExLlamaV2MoEMLP.static_routing for one test; restored after it."""
    saved = ExLlamaV2MoEMLP.static_routing
    yield lambda value: setattr(ExLlamaV2MoEMLP, "static_routing", value)
    ExLlamaV2MoEMLP.static_routing = saved


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe"])
def test_static_routing_gives_the_grouped_paths_tokens(name, static_routing, tmp_path):
    """Every expert over every token, masked: the same logits (to rounding) and the same greedy tokens as the
    grouped path, for a prefill and for cached decode steps of a batch."""
    cfg = ExLlamaV2Config(save_hf_model(_build(name), tmp_path))
    cfg.dtype = "float32"
    model = ExLlamaV2(cfg)
    model.load()
    ids = torch.randint(0, 131, (3, 9), generator=torch.Generator().manual_seed(6))
    runs = {}
    for static in (False, True):
        static_routing(static)
        cache = ExLlamaV2Cache(model, batch_size=3, max_seq_len=32)
        logits = [model.forward(ids, cache)[:, -1]]
        tokens = [logits[-1].argmax(-1)]
        for _ in range(4):
            logits.append(model.forward(tokens[-1].view(3, 1), cache)[:, -1])
            tokens.append(logits[-1].argmax(-1))
        runs[static] = torch.stack(logits), torch.stack(tokens)
    torch.testing.assert_close(runs[True][0], runs[False][0], atol=2e-5, rtol=1e-5)
    assert torch.equal(runs[True][1], runs[False][1])


def test_moe_decode_step_makes_no_host_sync_on_the_static_path(mixtral, static_routing):
    from exllamav2.runtime.paged_decode import paged_decode_step
    from host_sync import SyncTrace, host_syncs
    _, model = mixtral
    ps, b, pages = 4, 3, 16
    cache = ExLlamaV2Cache(model, 1, ps * pages)
    g = torch.Generator().manual_seed(7)
    traces = {}
    with torch.inference_mode():
        for static in (None, True, True):
            static_routing(static)
            table = torch.randperm(pages, generator=g)[:b * 4].view(b, 4)
            table = torch.cat((table, torch.zeros(b, pages - 4, dtype=torch.long)), 1)
            past = torch.randint(1, 12, (b,), generator=g)
            ids = torch.randint(0, 131, (1, b), generator=g)
            with SyncTrace() as t:
                logits = paged_decode_step(model, ids, cache, table, past, ps, ps * pages)
            assert torch.isfinite(logits).all()
            traces.setdefault(static, []).append(t.ops)
    # eager by default the grouped path counts tokens per expert on the host, once per MoE layer
    assert host_syncs(traces[None][0]).count("Tensor.tolist") == len(_moe_layers(model))
    assert not host_syncs(traces[True][0]), f"host syncs in the static MoE decode step: {host_syncs(traces[True][0])}"
    assert traces[True][0] == traces[True][1], "the static step's ops or shapes changed with the routing"


@pytest.mark.slow
def test_compiled_moe_decode_step_is_one_graph(mixtral):
    """Under torch.compile on the CPU the grouped path runs as one opaque op (moe_grouped_op.py): the decode step
    compiles with fullgraph=True."""
    from exllamav2.runtime.decode import DecodeRunner
    _, model = mixtral
    runner = DecodeRunner(model, compile=True, progress=False, batch_sizes=(2,), max_seq_len=64)
    assert not runner.graph_breaks
    ids = torch.randint(0, 131, (2, 6), generator=torch.Generator().manual_seed(8))
    with torch.inference_mode():  # the runner's buffers are inference tensors
        cache = ExLlamaV2Cache(model, batch_size=2, max_seq_len=64)
        model.forward(ids[:, :-1], cache, preprocess_only=True)
        compiled = runner(ids[:, -1:], cache)
        eager = model.forward(ids, ExLlamaV2Cache(model, batch_size=2, max_seq_len=64))[:, -1:]
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
