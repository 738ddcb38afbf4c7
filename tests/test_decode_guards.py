"""The compiled decode step skips dynamo's guards only for kinds of call that already ran with them checked
(exllamav2/runtime/guards.py): a new cache shape, a pinned backend or batch invariance each run checked first,
so dynamo compiles what they need, and the skipped calls give the checked calls' logits bit for bit."""

from __future__ import annotations

import pytest
import torch

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ops
from exllamav2.runtime.compile import bind_model
from exllamav2.runtime.guards import TrustedSteps, cache_kind, direct_frame, process_state
from test_decode_runner import teacher_forced


def _tiny_llama(tmp_path):
    import transformers as tf
    from parity import make_tiny, save_hf_model
    hf = make_tiny(tf.LlamaForCausalLM, tf.LlamaConfig(
        vocab_size=131, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128), init_scale=0.08)
    cfg = ExLlamaV2Config(save_hf_model(hf, tmp_path))
    cfg.max_seq_len = 64
    model = ExLlamaV2(cfg)
    model.load()
    return model


def _decode(model, cache, ids, tokens):
    return teacher_forced(model, ids, tokens, cache)


def test_trusted_steps_check_each_new_kind_once():
    calls = []
    trusted = TrustedSteps()

    def step(x):
        calls.append(torch.compiler.is_compiling())
        return x + 1

    assert trusted.call(step, ("a",), 1) == 2 and trusted.skipped == 0
    assert trusted.call(step, ("a",), 2) == 3 and trusted.skipped == 1
    assert trusted.call(step, ("b",), 2) == 3 and trusted.skipped == 1   # a new kind: checked
    with ops.use_backend("torch"):                                         # new process state: checked
        assert trusted.call(step, ("a",), 2) == 3 and trusted.skipped == 1
        assert trusted.call(step, ("a",), 2) == 3 and trusted.skipped == 2
    forced = TrustedSteps(check_guards=True)
    for _ in range(3):
        forced.call(step, ("a",), 0)
    assert forced.skipped == 0


def _toy(breaks: bool):
    """A compiled step of `bind_model`'s shape: a free model, tensor and int arguments (the int specialised at its
    first value, then dynamic, as the decode step's position)."""
    import types
    model = types.SimpleNamespace(w=torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))

    def f(model, x, past):
        y = x @ model.w
        if breaks:
            torch._dynamo.graph_break()
        return y * past + 1

    return model, f, torch.compile(bind_model(f, model, f"toy_step_{breaks}"), dynamic=None)


def test_direct_frames_run_each_kinds_graph_without_dynamo():
    model, f, step = _toy(breaks=False)
    x = torch.randn(2, 8)
    trusted = TrustedSteps()
    pasts = (1, 2, 3, 7, 1, 1, 5)
    for past in pasts:
        # the kind tells the graphs apart as the runners' kinds do: position 1 has a graph of its own
        assert torch.equal(trusted.call(step, (min(past, 2),), x, past), f(model, x, past)), past
    # every call after the first of its kind ran the captured code: a wrong graph (position 1's, or one made
    # static at 2) would have given another product above
    assert trusted.direct == trusted.skipped == len(pasts) - 2
    # the front entry (the general position's graph) is refused for arguments its guards reject
    assert direct_frame(step, (x, 4)) is not None
    assert direct_frame(step, (torch.randn(3, 8), 4)) is None and direct_frame(step, (x.double(), 4)) is None
    assert direct_frame(lambda *a: None, (x, 1)) is None  # not a compiled function


def test_direct_frames_keep_dynamo_after_a_graph_break():
    model, f, step = _toy(breaks=True)
    x = torch.randn(2, 8)
    trusted = TrustedSteps()
    for past in (1, 2, 3, 4):
        assert torch.equal(trusted.call(step, (min(past, 2),), x, past), f(model, x, past))
    assert trusted.direct == 0 and trusted.skipped == 2


def test_process_state_and_cache_kind_see_what_changes_a_graph(tmp_path):
    model = _tiny_llama(tmp_path)
    a, b = ExLlamaV2Cache(model, max_seq_len=64), ExLlamaV2Cache(model, max_seq_len=32)
    assert cache_kind(a) == cache_kind(ExLlamaV2Cache(model, max_seq_len=64)) != cache_kind(b)
    before = process_state()
    ops.set_batch_invariant(True)
    try:
        assert process_state() != before
    finally:
        ops.set_batch_invariant(None)
    assert process_state() == before
    with ops.use_backend("torch"):
        assert process_state() != before
    before = process_state()
    ops.set_cpu_activations("int8")
    try:
        assert process_state() != before
    finally:
        ops.set_cpu_activations("int16")
    assert process_state() == before


@pytest.mark.slow
def test_compiled_step_with_skipped_guards_equals_checked_and_follows_changes(tmp_path):
    """`pytest -m slow`: compiles a tiny model's step (~1 min on 2 cores)."""
    from torch._dynamo.utils import counters
    # dynamo remembers per step name which shapes changed between compiles (its automatic-dynamic state, process
    # wide): another test's steps would make this one's cache length dynamic from the start
    torch._dynamo.reset()
    model = _tiny_llama(tmp_path)
    ids = torch.randint(0, 131, (1, 9), generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(0, 131, (10,), generator=torch.Generator().manual_seed(1)).tolist()
    cache, short = ExLlamaV2Cache(model, max_seq_len=64), ExLlamaV2Cache(model, max_seq_len=32)
    eager, eager_short = _decode(model, cache, ids, tokens), _decode(model, short, ids, tokens)
    with ops.use_backend("torch"):
        eager_torch = _decode(model, cache, ids, tokens)
    runner = model.compile_decode(max_seq_len=64, progress=False)
    try:
        checked_runs = TrustedSteps(check_guards=True)
        runner.trusted, trusted = checked_runs, runner.trusted
        checked = _decode(model, cache, ids, tokens)
        assert checked_runs.skipped == 0
        runner.trusted = trusted
        got = _decode(model, cache, ids, tokens)
        assert trusted.skipped >= len(tokens) - 2       # all but the first call of each kind
        assert trusted.direct == trusted.skipped        # and those ran the compiled code without dynamo
        assert torch.equal(got, checked)
        span = eager.abs().max()
        assert (got - eager).abs().max() < 0.05 * span

        for label, run, want in (
                ("a cache of another length", lambda: _decode(model, short, ids, tokens), eager_short),
                ("the torch backend pinned", lambda: _with_torch(model, cache, ids, tokens), eager_torch)):
            graphs, skipped = counters["stats"]["unique_graphs"], trusted.skipped
            out = run()
            assert counters["stats"]["unique_graphs"] > graphs, label  # dynamo saw the change and compiled for it
            assert trusted.skipped > skipped, label                    # and later calls of that kind skip again
            assert (out - want).abs().max() < 0.05 * want.abs().max(), label
    finally:
        model.decode_runner = None


def _with_torch(model, cache, ids, tokens):
    with ops.use_backend("torch"):
        return _decode(model, cache, ids, tokens)


def test_unload_drops_the_decode_runner(tmp_path):
    from exllamav2.runtime.decode import DecodeRunner
    model = _tiny_llama(tmp_path)
    model.decode_runner = DecodeRunner(model, compile=False)
    model.unload()
    assert model.decode_runner is None


def test_inductor_cache_is_per_kernel_build(tmp_path, monkeypatch):
    """Compiled graphs call the custom ops by their schema: the on-disk cache is kept per build of the kernels, under
    the user's TORCHINDUCTOR_CACHE_DIR or our default, never torch's own default taken for the user's choice, and
    repeated calls do not nest."""
    import os
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    from exllamav2.ops.cpu import build, kernels
    from exllamav2.runtime import compile as rc
    monkeypatch.setattr(rc, "DEFAULT_CACHE_DIR", str(tmp_path / "ours"))
    key = build.loaded_key() if kernels.ready() else None
    sub = f"exllamav2-kernels-{key}" if key else ""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    got = rc.set_inductor_cache_dir()
    assert got == os.path.join(str(tmp_path / "ours"), sub).rstrip("/") and os.environ["TORCHINDUCTOR_CACHE_DIR"] == got
    assert rc.set_inductor_cache_dir() == got          # a second call keeps it
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert rc.set_inductor_cache_dir() == os.path.join(str(tmp_path / "mine"), sub).rstrip("/")
    if key:
        assert len(key) == 16 and os.path.isdir(got)
