"""The eager decode step's short path (exllamav2/eager_decode.py) against the general module forwards: the same
logits bit for bit, taken at every layer of a plain decode step, and not taken where the general forward must run
(an intervention, a padding mask, a quantized cache, the torch backend, a linear's forward replaced)."""

from __future__ import annotations

import gc

import pytest
import torch

from exllamav2 import ExLlamaV2Cache, eager_decode, ops
from exllamav2.cache_q import ExLlamaV2Cache_Q4
from exllamav2.module import Intervention
from test_backends import _load, write_tiny_llama
from test_gguf_support import write_tiny_gguf


@pytest.fixture(autouse=True)
def _auto_backend():
    ops.set_backend(None)
    yield
    ops.set_backend(None)


@pytest.fixture(scope="module")
def tiny_dense(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("dense"), vocab_size=200, intermediate_size=192,
                            num_key_value_heads=1)


class _Counter:
    """Wraps eager_decode's two entry points: counts the calls that took the short path; `off` forces the general
    forward."""

    def __init__(self, monkeypatch):
        # an Intervention left unreachable by another test still counts as alive (module.interventions_alive) until
        # the collector frees it, and while one lives no model takes the short path
        gc.collect()
        self.taken, self.off, self.by_block = 0, False, {"attention": 0, "mlp": 0}
        for name in ("attention", "mlp"):
            monkeypatch.setattr(eager_decode, name, self._wrap(name, getattr(eager_decode, name)))

    def reset(self):
        self.taken, self.by_block = 0, {"attention": 0, "mlp": 0}

    def _wrap(self, name, fn):
        def run(*args):
            if self.off:
                return None
            out = fn(*args)
            self.taken += out is not None
            self.by_block[name] += out is not None
            return out
        return run


def _decode(model, ids, prompt, cache=None, **kw):
    cache = cache or ExLlamaV2Cache(model, batch_size=ids.shape[0], max_seq_len=64)
    out = [model.forward(ids[:, :prompt], cache, last_id_only=True, **kw)[:, -1]]
    for i in range(prompt, ids.shape[1]):
        out.append(model.forward(ids[:, i:i + 1], cache, **kw)[:, -1])
    return torch.stack(out, 1)


def _models(tiny_dense, tmp_path):
    yield "dense bf16", _load(tiny_dense)
    yield "dense fp32", _load(tiny_dense, dtype=torch.float32)
    for q in ("Q4_0", "Q8_0", "Q4_K"):
        hidden = 256 if q == "Q4_K" else 128
        path = write_tiny_gguf(str(tmp_path / f"{q}.gguf"), qtype=q, hidden=hidden, ffn=2 * hidden, vocab=96,
                               heads=4, kv_heads=2, tied=False)
        yield f"gguf {q}", _load(path)


@pytest.mark.parametrize("rows", [1, 3, 9])
def test_short_path_equals_the_general_forward(rows, tiny_dense, tmp_path, monkeypatch):
    """Bit for bit, through the C++ block ops (GGUF blocks; dense bf16 up to the bf16 GEMV's 8 rows) and through the
    Python short path (dense fp32; dense bf16 at 9 rows)."""
    counter = _Counter(monkeypatch)
    for name, model in _models(tiny_dense, tmp_path):
        vocab = model.config.vocab_size
        ids = torch.randint(3, vocab, (rows, 12), generator=torch.Generator().manual_seed(rows))
        counter.off, counter.taken = True, 0
        ref = _decode(model, ids, 5)
        counter.off = False
        got = _decode(model, ids, 5)
        layers = model.config.num_hidden_layers
        # every decode step's two blocks per layer, and the prompt's MLPs (rows x positions within MLP_ROWS)
        prompt_mlps = layers if rows * 5 <= eager_decode.MLP_ROWS else 1  # else only the last one, on 1 position
        assert counter.taken == 7 * 2 * layers + prompt_mlps, (name, counter.taken)
        assert torch.equal(got, ref), name
        blocks = [m._eager_plan.block is not None for m in model.modules if "_eager_plan" in m.__dict__]
        assert len(blocks) == 2 * layers
        assert all(blocks) == (name != "dense fp32"), (name, blocks)


def test_not_taken_where_the_general_forward_must_run(tiny_dense, monkeypatch):
    counter = _Counter(monkeypatch)
    model = _load(tiny_dense)
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(1))
    counter.off = True
    ref = _decode(model, ids, 5)
    counter.off = False

    # an intervention anywhere in the process: the modules' hook points must see every tensor
    attn = model.modules[1]
    seen = []
    attn.o_proj = Intervention(attn.o_proj, post_forward=lambda h, *a, **k: seen.append(h.shape) or h)
    counter.taken = 0
    assert torch.equal(_decode(model, ids, 5), ref) and seen and counter.taken == 0
    attn.o_proj = attn.o_proj.inner
    del seen[:]

    # a padding mask (and the positions it shifts): attention runs the general forward, the MLP (per position)
    # still takes the short path, and the logits are the general forward's
    offsets = torch.tensor([[0], [-2]])
    mask = torch.arange(9).unsqueeze(0) >= (-offsets)
    counter.off = True
    masked_ref = _decode(model, ids, 5, input_mask=mask, position_offsets=offsets)
    counter.off = False
    counter.reset()
    assert torch.equal(_decode(model, ids, 5, input_mask=mask, position_offsets=offsets), masked_ref)
    assert counter.by_block == {"attention": 0, "mlp": 5 * model.config.num_hidden_layers}

    # a quantized cache reads its codes inside attention; the MLP still takes the short path
    counter.reset()
    _decode(model, ids, 5, cache=ExLlamaV2Cache_Q4(model, batch_size=2, max_seq_len=64))
    assert counter.by_block == {"attention": 0, "mlp": 5 * model.config.num_hidden_layers}

    # the torch backend pinned: its reference ops, not the cpu kernels
    counter.taken = 0
    with ops.use_backend("torch"):
        _decode(model, ids, 5)
    assert counter.taken == 0

    # a linear's forward replaced on the instance (the converter watches outputs that way)
    counter.reset()
    mlp = model.modules[2]
    mlp.down_proj.forward = lambda x, *a, **k: type(mlp.down_proj).forward(mlp.down_proj, x, *a, **k) * 0
    try:
        out = _decode(model, ids, 5)
    finally:
        del mlp.down_proj.forward
    # the first layer's MLP runs the general forward for the prompt and at each of the 4 decode steps
    assert counter.taken == (2 * 4 + 1) * model.config.num_hidden_layers - 5
    assert not torch.equal(out, ref)
    assert torch.equal(_decode(model, ids, 5), ref)


def test_weight_edits_reach_the_short_path(tiny_dense, monkeypatch):
    """A weight set after the first step (the plan holds the prepared kernels) is used by the next step."""
    counter = _Counter(monkeypatch)
    model = _load(tiny_dense)
    ids = torch.randint(3, 200, (1, 8), generator=torch.Generator().manual_seed(2))
    before = _decode(model, ids, 4)
    o = model.modules[1].o_proj
    w = o.weight.data.clone()
    o.weight = torch.nn.Parameter(w * 0.5, requires_grad=False)
    counter.off = True
    ref = _decode(model, ids, 4)
    counter.off, counter.taken = False, 0
    got = _decode(model, ids, 4)
    assert counter.taken > 0 and torch.equal(got, ref) and not torch.equal(got, before)


def test_dynamic_generator_packed_steps(tmp_path, monkeypatch):
    """The dynamic generator's packed decode steps (several sequences, one new token each, over the paged cache)
    take the C++ attention block and the MLP block: the same greedy tokens, logprobs bit for bit."""
    from exllamav2.generator.dynamic import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob
    from exllamav2.generator.sampler import ExLlamaV2Sampler
    from test_dynamic_tiny import PAGE, build_tiny_dir, load_tiny

    model, tok = load_tiny(build_tiny_dir(tmp_path / "m"), "bfloat16")
    counter = _Counter(monkeypatch)
    prompts = ["The capital of France is", "Once upon a time", "1, 2, 3,"]

    def run():
        gen = ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, 1, 32 * PAGE), tok, page_size=PAGE)
        gen.enqueue([ExLlamaV2DynamicJob(tok.encode(p), 10, gen_settings=ExLlamaV2Sampler.Settings.greedy(),
                                         identifier=i, return_logits=True) for i, p in enumerate(prompts)])
        out = {}
        while gen.num_remaining_jobs():
            for r in gen.iterate():
                if r.get("stage") == "streaming":
                    out.setdefault(r["identifier"], []).append(r.get("logits"))
        return out

    counter.off = True
    ref = run()
    counter.off = False
    counter.reset()
    got = run()
    assert counter.by_block["attention"] > 0 and counter.by_block["mlp"] > 0
    assert ref.keys() == got.keys() == {0, 1, 2}
    for i in ref:
        a = torch.cat([t for t in ref[i] if t is not None], 1)
        b = torch.cat([t for t in got[i] if t is not None], 1)
        assert a.shape[1] > 1 and torch.equal(a, b)


def test_modules_replaced_after_the_first_step(tiny_dense, monkeypatch):
    """What the general forward reads at each call, the short path reads too: a norm's forward replaced on the
    instance, an output linear (o_proj, down_proj) swapped for another loaded one (no kernel is prepared, so the
    kernel epoch stays), an activation renamed. Before, the first step's plan kept running the old modules (and a
    renamed activation raised KeyError in the MLP block op's argument)."""
    counter = _Counter(monkeypatch)
    model = _load(tiny_dense)
    ids = torch.randint(3, 200, (2, 8), generator=torch.Generator().manual_seed(4))
    a0, m0, a1, m1 = model.modules[1:5]
    _decode(model, ids, 4)  # the plans are made

    def check(change, undo):
        change()
        try:
            counter.off = True
            ref = _decode(model, ids, 4)
            counter.off = False
            counter.reset()
            got = _decode(model, ids, 4)
        finally:
            undo()
        # the other blocks keep the short path; a swapped-in linear's block takes it too (its plan made again)
        assert torch.equal(got, ref) and counter.taken > 0

    def half(x, *a, **k):
        return x * 0.5

    for norm in (a0.pre_layernorm, m0.pre_layernorm):
        check(lambda: setattr(norm, "forward", half), lambda: delattr(norm, "forward"))

    def swap(name, p, q):
        def run():
            x, y = getattr(p, name), getattr(q, name)
            setattr(p, name, y)
            setattr(q, name, x)
        return run

    check(swap("o_proj", a0, a1), swap("o_proj", a0, a1))
    check(swap("down_proj", m0, m1), swap("down_proj", m0, m1))
    check(lambda: setattr(m0, "act_name", "relu"), lambda: setattr(m0, "act_name", "silu"))


def test_unload_frees_the_weights_the_plans_read(tiny_dense, tmp_path, monkeypatch):
    """The plans hold no kernel (nor the weights in their block arguments): model.unload() frees every layer's
    prepared kernels as it does without the short path, and the reloaded model takes the short path again."""
    import gc
    import weakref

    counter = _Counter(monkeypatch)
    path = write_tiny_gguf(str(tmp_path / "q8.gguf"), qtype="Q8_0", hidden=128, ffn=256, vocab=96, heads=4,
                           kv_heads=2, tied=False)
    for model in (_load(tiny_dense), _load(path)):
        ids = torch.randint(3, 96, (2, 8), generator=torch.Generator().manual_seed(5))
        ref = _decode(model, ids, 4)
        blocks = [m for m in model.modules if "_eager_plan" in m.__dict__]
        assert blocks and all(m._eager_plan.block is not None for m in blocks)
        held = [weakref.ref(k) for m in blocks
                for g in ((m.qkv, m.o_proj) if hasattr(m, "qkv") else (m.gate_up, m.down_proj))
                for k in g._kernels.values() if k]
        assert len(held) >= 2 * len(blocks)
        model.unload()
        gc.collect()
        assert not any(r() is not None for r in held)
        assert all(m._eager_plan.block is None for m in blocks)
        model.load()
        counter.reset()
        assert torch.equal(_decode(model, ids, 4), ref) and counter.taken > 0


def _normed_model(kind, tmp_path):
    """Per-head q/k norms: Qwen3 (plain residual), Gemma 3 (post-norms, fp32 residual stream, sliding windows shorter
    than the decode, per-layer RoPE)."""
    import transformers as tf
    from parity import make_tiny, save_hf_model
    common = dict(vocab_size=131, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    if kind == "qwen3":
        hf = make_tiny(tf.Qwen3ForCausalLM, tf.Qwen3Config(**common), seed=5, init_scale=0.08)
    else:
        cfg = tf.Gemma3TextConfig(**common, sliding_window=8, query_pre_attn_scalar=12,
                                  layer_types=["sliding_attention", "sliding_attention", "full_attention"])
        hf = make_tiny(tf.Gemma3ForCausalLM, cfg, seed=6, init_scale=0.08)
        with torch.no_grad():
            for name, p in hf.named_parameters():
                if "norm" in name and name.endswith("weight"):
                    p.sub_(1.0)  # Gemma applies (1 + w)
    return _load(save_hf_model(hf, tmp_path / kind))


@pytest.mark.parametrize("kind", ["qwen3", "gemma3"])
@pytest.mark.parametrize("rows", [1, 3])
def test_q_k_norm_blocks_equal_the_general_forward(kind, rows, tmp_path, monkeypatch):
    model = _normed_model(kind, tmp_path)
    counter = _Counter(monkeypatch)
    ids = torch.randint(3, 131, (rows, 14), generator=torch.Generator().manual_seed(rows))
    counter.off = True
    ref = _decode(model, ids, 5)
    counter.off = False
    counter.reset()
    got = _decode(model, ids, 5)
    layers = model.config.num_hidden_layers
    assert torch.equal(got, ref)
    # every decode step's attention through attn_normed_decode_block, its MLP through the (extended) MLP block
    assert counter.by_block["attention"] == 9 * layers and counter.by_block["mlp"] >= 9 * layers
    plans = [m._eager_plan for m in model.modules if "_eager_plan" in m.__dict__]
    assert len(plans) == 2 * layers and all(p.block is not None and p.normed is not None for p in plans[::2])
