"""The compiled CPU decode step of an MoE model (moe_grouped_op.py): the grouped expert path runs as one opaque
custom op, so the step stays one graph, gives eager's logits to the bit, and runs only the experts its tokens
picked (the static path would run all of them); the op's fake implementation matches its real output; handles
follow their modules; the MoE hook points act inside a compiled forward as they do eagerly."""

from __future__ import annotations

import gc
from collections import Counter

import pytest
import torch
import transformers as tf
from torch._subclasses.fake_tensor import FakeTensorMode

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
from exllamav2.module import Intervention
from exllamav2.moe_grouped_op import moe_grouped_experts, registered
from exllamav2.moe_mlp import ExLlamaV2MoEMLP
from parity import make_tiny, save_hf_model

# 8 experts, top-2, a batch of 2: at most 4 experts of 8 run per layer and step
SHAPE = dict(vocab_size=131, hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=128, num_experts=8, num_experts_per_tok=2,
             moe_intermediate_size=24, norm_topk_prob=True)
BATCH, STEPS, SEQ = 2, 6, 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    hf = make_tiny(tf.Qwen3MoeForCausalLM, tf.Qwen3MoeConfig(**SHAPE), seed=11, init_scale=0.08)
    return save_hf_model(hf, tmp_path_factory.mktemp("qwen3_moe"))


def _load(model_dir):
    cfg = ExLlamaV2Config(model_dir)
    cfg.max_seq_len = SEQ
    model = ExLlamaV2(cfg)
    model.load()  # bf16, the CPU default
    return model


def _moes(model):
    return [m for m in model.modules if isinstance(m, ExLlamaV2MoEMLP)]


def _prompt():
    return torch.randint(0, 131, (BATCH, 7), generator=torch.Generator().manual_seed(2))


def _prefill(model):
    # a plain cache, as generators make (one made under inference_mode holds other tensors: a new graph)
    cache = ExLlamaV2Cache(model, batch_size=BATCH, max_seq_len=SEQ)
    logits = model.forward(_prompt(), cache, last_id_only=True)
    return cache, logits[:, -1:].argmax(-1)


def _greedy(model, cache, tok):
    """STEPS greedy decode steps through model.forward (the runner's compiled step once it is enabled)."""
    logits, tokens = [], []
    for _ in range(STEPS):
        out = model.forward(tok, cache)
        tok = out[:, -1:].argmax(-1)
        logits.append(out)
        tokens.append(tok)
    return torch.stack(logits), torch.stack(tokens)


@pytest.fixture(scope="module")
def compiled(model_dir):
    """A tiny Qwen3-MoE, its eager greedy decode, then its decode step compiled for a batch of 2 (2 cores: ~25 s
    the first time, ~5 s from inductor's disk cache)."""
    model = _load(model_dir)
    eager = _greedy(model, *_prefill(model))
    runner = model.compile_decode(batch_sizes=(BATCH,), max_seq_len=SEQ, progress=False)
    yield model, runner, eager
    model.decode_runner = None


def test_compiled_step_gives_eager_logits_without_recompiling(compiled):
    from torch._dynamo.utils import counters
    model, runner, (eager_logits, eager_tokens) = compiled
    assert not runner.graph_breaks  # one graph: the host read of the routing is inside the op
    graphs = counters["stats"]["unique_graphs"]
    logits, tokens = _greedy(model, *_prefill(model))
    assert counters["stats"]["unique_graphs"] == graphs  # the warm-up compiled all the steps need
    assert runner.trusted.skipped >= STEPS - 1            # the steps ran the compiled graph
    assert torch.equal(tokens, eager_tokens)
    assert torch.equal(logits, eager_logits)


def test_compiled_step_runs_only_the_picked_experts(compiled, monkeypatch):
    """Each compiled step calls each MoE layer's grouped path once, and exactly the linears of the experts its
    tokens picked, once each. (The static path runs every expert inside the graph: no call reaches them.)"""
    model, _, _ = compiled
    routed, ran = [], []
    for moe in _moes(model):
        def spy(x, weights, ids, inter=None, moe=moe, grouped=moe.forward_grouped):
            routed.append((moe, sorted(set(ids.flatten().tolist()))))
            return grouped(x, weights, ids, inter)
        monkeypatch.setattr(moe, "forward_grouped", spy)
        for linear in moe.experts:
            def counting(*args, linear=linear, forward=linear.forward, **kwargs):
                ran.append(linear)
                return forward(*args, **kwargs)
            monkeypatch.setattr(linear, "forward", counting)
    cache, tok = _prefill(model)  # eager: its calls are not counted
    routed.clear(), ran.clear()
    _greedy(model, cache, tok)
    moes = _moes(model)
    assert [moe for moe, _ in routed] == moes * STEPS
    k, n = SHAPE["num_experts_per_tok"], SHAPE["num_experts"]
    assert all(0 < len(experts) <= BATCH * k < n for _, experts in routed)
    want = [lin for moe, experts in routed for e in experts for lin in (moe.w1[e], moe.w3[e], moe.w2[e])]
    assert Counter(map(id, ran)) == Counter(map(id, want))


def test_fake_impl_matches_the_real_output(compiled):
    model, _, _ = compiled
    moe = _moes(model)[0]
    x = torch.randn(3, 5, moe.hidden_size, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    weights, ids = moe.route(x.view(-1, moe.hidden_size))
    real = moe_grouped_experts(x, weights, ids, moe.handle)
    assert torch.equal(real, moe.forward_grouped(x, weights, ids))
    with FakeTensorMode() as mode:
        fake = moe_grouped_experts(mode.from_tensor(x), mode.from_tensor(weights), mode.from_tensor(ids), moe.handle)
    assert (fake.shape, fake.dtype, fake.stride()) == (real.shape, real.dtype, real.stride()) == \
        ((15, moe.hidden_size), torch.bfloat16, (moe.hidden_size, 1))
    torch.library.opcheck(moe_grouped_experts, (x, weights, ids, moe.handle))


def test_hook_points_act_inside_a_compiled_forward(compiled):
    """An edit at pre_down (inside the op) and one at the branch output (outside it): a fullgraph-compiled MoE
    forward gives the eager forward's result with the same edits, to the bit."""
    model, _, _ = compiled
    moe = _moes(model)[1]
    x = torch.randn(2, 3, moe.hidden_size, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    plain = moe.forward(x)
    pre_down, out = moe.pre_down_point, moe.out_point
    moe.pre_down_point = Intervention(pre_down, pre_forward=lambda h, *a, **k: h * 2)
    moe.out_point = Intervention(out, post_forward=lambda h, *a, **k: h + 1)
    try:
        edited = moe.forward(x)
        got = torch.compile(moe.forward, backend="aot_eager", fullgraph=True)(x)
    finally:
        moe.pre_down_point, moe.out_point = pre_down, out
    assert not torch.equal(edited, plain)
    assert torch.equal(got, edited)


def test_handles_follow_their_modules(model_dir, compiled):
    first = {moe.handle for moe in _moes(compiled[0])}
    model = _load(model_dir)
    moes = _moes(model)
    handles = [moe.handle for moe in moes]
    assert not first & set(handles) and len(set(handles)) == len(handles)
    model.unload()
    model.load()  # the same modules: their handles still valid
    assert [registered(h) for h in handles] == moes
    x = torch.randn(1, 2, moes[0].hidden_size).to(torch.bfloat16)
    weights, ids = moes[0].route(x.view(-1, moes[0].hidden_size))
    del model, moes
    gc.collect()
    assert all(registered(h) is None for h in handles)  # the registry kept no dropped model alive
    with pytest.raises(RuntimeError, match="no MoE module has handle"):
        moe_grouped_experts(x, weights, ids, handles[0])
