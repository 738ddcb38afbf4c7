"""The decode runner (exllamav2/runtime/decode.py) and the fast backends end to end through the seed API and the
generators: compiled and eager steps give the same tokens; the runner steps aside for interventions, LoRA and
padding; a steering vector moves the output on the default backends exactly as on `torch`.

SmolLM2 is run from its GGUF (packed Q4_1 blocks on the `cpu` backend, dequantised on `torch`)."""

from __future__ import annotations

import pytest
import torch

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ops
from exllamav2.generator import ExLlamaV2BaseGenerator, ExLlamaV2Sampler, ExLlamaV2StreamingGenerator
from exllamav2.generator.dynamic import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob
from exllamav2.interventions import SteeringVectors, add_edit
from exllamav2.interventions.edits import AddVector
from exllamav2.runtime.decode import DecodeRunner

GREEDY = ExLlamaV2Sampler.Settings.greedy()
PROMPT = "The best way to learn a new language is"


@pytest.fixture(scope="module")
def smol(smollm2_default):
    return smollm2_default


class CountingRunner(DecodeRunner):
    """The eager runner, counting the steps it takes."""

    def __init__(self, model):
        super().__init__(model, compile=False)
        self.steps = 0

    def __call__(self, input_ids, cache):
        self.steps += 1
        return super().__call__(input_ids, cache)


def greedy_loop(model, ids, n, cache):
    cache.current_seq_len = 0
    logits = model.forward(ids, cache, last_id_only=True)
    out = []
    for _ in range(n):
        tok = logits[:, -1].argmax(-1, keepdim=True)
        out.append(int(tok))
        logits = model.forward(tok, cache)
    return out


def stream_tokens(model, cache, tok, ids, n):
    stream = ExLlamaV2StreamingGenerator(model, cache, tok)
    stream.set_stop_conditions([])
    stream.begin_stream_ex(ids, GREEDY, max_new_tokens=n)
    got = []
    while True:
        r = stream.stream_ex()
        got += r["chunk_token_ids"].flatten().tolist()
        if r["eos"]:
            return got


def test_every_generator_and_the_seed_api_go_through_the_runner(smol):
    model, tok = smol
    ids = tok.encode(PROMPT)
    cache = ExLlamaV2Cache(model, max_seq_len=256)
    ref = greedy_loop(model, ids, 12, cache)
    runner = model.decode_runner = CountingRunner(model)
    try:
        assert greedy_loop(model, ids, 12, cache) == ref and runner.steps == 12
        text = ExLlamaV2BaseGenerator(model, cache, tok).generate_simple(PROMPT, GREEDY, 12, stop_token=None,
                                                                         completion_only=True)
        assert runner.steps == 24 and tok.encode(text)[0].tolist()[:4] == ref[:4]
        assert stream_tokens(model, cache, tok, ids, 12) == ref and runner.steps == 36
        # the dynamic generator's packed, paged forward does not use it, and gives the same tokens
        dyn = ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, 1, 256), tok, page_size=64)
        job = ExLlamaV2DynamicJob(ids, 12, gen_settings=GREEDY, stop_conditions=[])
        dyn.enqueue(job)
        tokens = []
        while dyn.num_remaining_jobs():
            for r in dyn.iterate():
                tokens += r.get("token_ids", torch.empty(0)).flatten().tolist() if r.get("stage") == "streaming" else []
        assert tokens == ref and runner.steps == 36
        # a padding mask, LoRA-free but padded batches and interventions run the modules eagerly instead
        h = add_edit(model, "blocks.3.resid_post", AddVector(torch.zeros(model.config.hidden_size)))
        try:
            assert greedy_loop(model, ids, 4, cache) == ref[:4] and runner.steps == 36
        finally:
            h.remove()
        assert greedy_loop(model, ids, 4, cache) == ref[:4] and runner.steps == 40
    finally:
        model.decode_runner = None


def test_steering_moves_output_on_the_fast_backend_as_on_torch(smol):
    model, tok = smol
    ids = tok.encode(PROMPT)
    g = torch.Generator().manual_seed(0)
    sv = SteeringVectors({9: torch.randn(model.config.hidden_size, generator=g) * 6.0}, "resid_post", "SmolLM2")
    cache = ExLlamaV2Cache(model, max_seq_len=256)
    results = {}
    for backend in ("torch", None):
        with ops.use_backend(backend):
            plain = greedy_loop(model, ids, 10, cache)
            cache.current_seq_len = 0
            base_logits = model.forward(ids, cache, last_id_only=True)[0, -1]
            with sv.register(model, scale=1.0):
                steered = greedy_loop(model, ids, 10, cache)
                cache.current_seq_len = 0
                steered_logits = model.forward(ids, cache, last_id_only=True)[0, -1]
        results[backend] = (plain, steered, steered_logits - base_logits)
    (p_ref, s_ref, d_ref), (p_fast, s_fast, d_fast) = results["torch"], results[None]
    assert s_ref[:3] != p_ref[:3], "the vector must change the greedy output at once"
    # the same edit at the same point: the same steered start, and the logit shift it causes agrees. (Long greedy
    # runs of this model drift apart between any two arithmetics, bf16 against fp32 included: its residual
    # stream reaches 2.5e4, where one bf16 step is 128.)
    assert s_fast[:3] == s_ref[:3] and p_fast[:3] == p_ref[:3]
    assert torch.nn.functional.cosine_similarity(d_fast, d_ref, dim=0) > 0.98


def teacher_forced(model, ids, tokens, cache):
    """Logits of every decode step when the given tokens are fed (so two arithmetics see the same inputs)."""
    cache.current_seq_len = 0
    out = [model.forward(ids, cache, last_id_only=True)[0, -1]]
    for t in tokens:
        out.append(model.forward(torch.tensor([[t]]), cache)[0, -1])
    return torch.stack(out)


@pytest.mark.slow
def test_compiled_step_equals_eager(smol):
    """torch.compile of the step (about a minute on 2 cores; `pytest -m slow`). Inductor fuses the norms and
    keeps some intermediates in fp32 where eager rounds them to bf16, so logits agree to bf16 precision and the
    argmax agrees but for near ties."""
    model, tok = smol
    ids = tok.encode(PROMPT)
    cache = ExLlamaV2Cache(model, max_seq_len=256)
    tokens = greedy_loop(model, ids, 16, cache)
    eager = teacher_forced(model, ids, tokens, cache)
    runner = model.compile_decode(max_seq_len=256, progress=False)
    try:
        assert runner.compiled and runner.compile_seconds > 0
        from torch._dynamo.utils import counters
        graphs = counters["stats"]["unique_graphs"]
        got = teacher_forced(model, ids, tokens, cache)
        # the warm-up compiled everything a real decode needs: no compile at the first real steps
        assert counters["stats"]["unique_graphs"] == graphs
        span = eager.abs().max()
        assert (got - eager).abs().max() < 0.05 * span
        assert (got.argmax(-1) == eager.argmax(-1)).sum() >= 14  # of 17 steps
        # the generators reach the compiled step too
        assert stream_tokens(model, cache, tok, ids, 4) == greedy_loop(model, ids, 4, cache)
    finally:
        model.decode_runner = None


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["mixtral", "gemma2", "gptj"])
def test_compiled_step_on_other_architectures(arch, tmp_path):
    """MoE (the grouped experts as one opaque op while compiling, moe_grouped_op.py: one graph), logit softcap with
    sliding window, and a parallel block with partial interleaved RoPE, compiled against eager (`pytest -m slow`)."""
    import transformers as tf
    from parity import make_tiny, save_hf_model
    common = dict(vocab_size=131, hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=6,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=128)
    hf = {"mixtral": lambda: tf.MixtralForCausalLM(tf.MixtralConfig(**common, num_local_experts=4)),
          "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**common, sliding_window=8, query_pre_attn_scalar=8)),
          "gptj": lambda: tf.GPTJForCausalLM(tf.GPTJConfig(n_embd=48, n_layer=2, n_head=6, rotary_dim=4,
                                                           n_positions=128, vocab_size=131))}[arch]()
    hf = make_tiny(type(hf), hf.config, init_scale=0.08)
    cfg = ExLlamaV2Config(save_hf_model(hf, tmp_path))
    cfg.max_seq_len = 64
    model = ExLlamaV2(cfg)
    model.load()
    cache = ExLlamaV2Cache(model, max_seq_len=64)
    ids = torch.randint(0, 131, (1, 10), generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(0, 131, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    eager = teacher_forced(model, ids, tokens, cache)
    runner = model.compile_decode(max_seq_len=64, progress=False)
    try:
        assert not runner.graph_breaks
        got = teacher_forced(model, ids, tokens, cache)
        assert (got - eager).abs().max() < 0.05 * eager.abs().max()
    finally:
        model.decode_runner = None


def _decode_params_pair(model, lens, page_size, shuffle_seed):
    """A decode-only step for sequences of `lens` tokens over scattered pages: the packed PagedParams the dynamic
    generator builds, and the same step as device tensors (PagedDecodeParams' inputs)."""
    from exllamav2.paged_attn import PagedParams
    g = torch.Generator().manual_seed(shuffle_seed)
    need = [-(-(n + 1) // page_size) for n in lens]
    order = torch.randperm(sum(need), generator=g).tolist()
    tables, i = [], 0
    for k in need:
        tables.append(order[i:i + k])
        i += k
    packed = PagedParams(tables, list(lens), [1] * len(lens), page_size)
    table = torch.zeros(len(lens), 64, dtype=torch.long)
    table[:, :packed.block_index.shape[1]] = packed.block_index
    return tables, packed, table, torch.tensor(lens)


def test_paged_decode_step_equals_the_packed_forward(tmp_path):
    """The dynamic generator's compiled decode path (runtime/paged_decode.py) run eagerly: its logits equal the
    packed forward's to the bit, for scattered pages and several sequences, one within its sliding window and two
    cut by it; and
    each sequence's row agrees alone and among the others (to fp32 rounding: this tiny model's dense fp32 GEMMs
    round a row differently at different row counts; tests/test_batch_invariance.py holds the default weights
    to the bit)."""
    from test_dynamic_tiny import build_tiny_dir, load_tiny
    from exllamav2.generator.dynamic_draft import packed_forward
    from exllamav2.runtime.paged_decode import paged_decode_step
    model, _ = load_tiny(build_tiny_dir(tmp_path, sliding_window=5))
    ps, lens = 4, [3, 9, 17]
    cache = ExLlamaV2Cache(model, 1, 256)
    g = torch.Generator().manual_seed(0)
    for layer in range(len(cache.key_states)):
        cache.key_states[layer].normal_(generator=g)
        cache.value_states[layer].normal_(generator=g)
    snapshot = [(k.clone(), v.clone()) for k, v in zip(cache.key_states, cache.value_states)]
    ids = torch.randint(0, 1000, (1, len(lens)), generator=g)
    tables, packed, table, past = _decode_params_pair(model, lens, ps, 1)
    with torch.inference_mode():
        ref = packed_forward(model, cache, ids, packed, packed.last_token_index)
        for (k, v), (k0, v0) in zip(zip(cache.key_states, cache.value_states), snapshot):
            k.copy_(k0), v.copy_(v0)
        got = paged_decode_step(model, ids, cache, table, past, ps, 256)
        assert torch.equal(got, ref)
        for i in range(len(lens)):
            alone = paged_decode_step(model, ids[:, i:i + 1], cache, table[i:i + 1], past[i:i + 1], ps, 256)
            assert torch.allclose(alone[0], ref[i], rtol=1e-5, atol=1e-5 * ref[i].abs().max())


@pytest.mark.slow
def test_dynamic_generator_runs_the_compiled_paged_step(tmp_path):
    """With model.compile_decode(), the dynamic generator's decode steps run compiled (one graph for any number of
    sequences), giving the eager generator's logits to within compile rounding and its tokens
    (`pytest -m slow`: two compiles, ~45 s)."""
    from test_dynamic_tiny import build_tiny_dir, load_tiny
    model, tok = load_tiny(build_tiny_dir(tmp_path, sliding_window=8))

    def run(n_new, only=None):
        gen = ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, 1, 256), tok, page_size=16)
        logits, orig = [], gen._forward

        def record(ids, params, rows):
            out = orig(ids, params, rows)
            if max(params.q_lens) == 1:
                logits.append(out.clone())
            return out
        gen._forward = record
        for i, n in enumerate(n_new):  # jobs of different lengths: the step count goes 3 -> 2 -> 1 sequences
            ids = torch.randint(0, 49152, (1, 5 + 7 * i), generator=torch.Generator().manual_seed(i))
            if only is None or i == only:
                gen.enqueue(ExLlamaV2DynamicJob(ids, n, gen_settings=GREEDY, stop_conditions=[]))
        tokens: dict = {}
        while gen.num_remaining_jobs():
            for r in gen.iterate():
                if r.get("stage") == "streaming":
                    tokens.setdefault(r["serial"], []).extend(r["token_ids"].flatten().tolist())
        return tokens, logits

    eager_tokens, eager_logits = run([12, 20, 30])
    runner = model.compile_decode(max_seq_len=256, progress=False, paged=True)
    try:
        tokens, logits = run([12, 20, 30])
        assert runner.paged._steps and all(s.done for s in runner.paged._steps.values()) and runner.paged.failed is None
        assert tokens == eager_tokens
        # each job alone gives its tokens among the others (the same graph serves one sequence and several)
        for i, serial in enumerate(sorted(tokens)):
            alone, _ = run([12, 20, 30], only=i)
            assert list(alone.values()) == [tokens[serial]]
        assert len(logits) == len(eager_logits)
        for a, b in zip(logits, eager_logits):
            assert (a - b).abs().max() < 1e-3 * b.abs().max()
    finally:
        model.decode_runner = None


def test_mixed_step_runs_decode_rows_apart_from_prompts(tmp_path):
    """A step where some sequences decode one token while another reads its prompt: the one-token sequences go
    through the decode step (here run eagerly in its compiled place), the prompt through the packed forward, and the
    logits come back in the order asked, equal to the whole step run as one packed forward."""
    from test_dynamic_tiny import build_tiny_dir, load_tiny
    from exllamav2.generator.dynamic_draft import _eager
    from exllamav2.paged_attn import PagedParams
    from exllamav2.runtime.paged_decode import PagedDecode, _Lazy, paged_decode_step
    model, _ = load_tiny(build_tiny_dir(tmp_path))
    cache = ExLlamaV2Cache(model, 1, 128)
    g = torch.Generator().manual_seed(0)
    for k, v in zip(cache.key_states, cache.value_states):
        k.normal_(generator=g), v.normal_(generator=g)
    snapshot = [(k.clone(), v.clone()) for k, v in zip(cache.key_states, cache.value_states)]
    # sequence 0 decodes, 1 reads 5 prompt tokens (wants its last), 2 decodes, 3 reads 3 without wanting logits
    params = PagedParams([[0, 1], [2], [3, 4], [5]], [9, 0, 17, 2], [1, 5, 1, 3], 16)
    ids = torch.randint(0, 1000, (1, 10), generator=g)
    rows = torch.tensor([0, 5, 6])  # packed index of seq 0's token, seq 1's last, seq 2's token
    runner = DecodeRunner(model, compile=False)
    paged = PagedDecode(runner)
    calls = []

    def step(*args):  # the compiled step's arguments: the model is bound in (runtime/compile.py: bind_model)
        calls.append(args[0].shape[1])
        return paged_decode_step(model, *args)
    paged._steps = {2: _Lazy(step, "", False)}  # the bucket of two sequences
    with torch.inference_mode():
        want = _eager(model, cache, ids, params, rows, None)
        for (k, v), (k0, v0) in zip(zip(cache.key_states, cache.value_states), snapshot):
            k.copy_(k0), v.copy_(v0)
        got = paged.forward(ids, cache, params, rows, lambda i, p, r: _eager(model, cache, i, p, r, None))
        kv_after = [k.clone() for k in cache.key_states]
    assert calls == [2]  # the two decoding sequences, in one call of the decode step
    assert got.shape == want.shape == (3, model.config.vocab_size)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    # every sequence's new K/V were written, the prompt that wanted no logits included
    for k, (k0, _) in zip(kv_after, snapshot):
        assert not torch.equal(k[0, 5 * 16:5 * 16 + 5], k0[0, 5 * 16:5 * 16 + 5])  # page-major (cache.py)


def test_ticker_writes_whole_lines_to_a_log(monkeypatch):
    """Progress written to a file (not a terminal) has no carriage returns: one line when the work ends."""
    import io
    import sys

    from exllamav2.runtime.compile import Ticker

    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    with Ticker("Compiling x", True):
        pass
    assert log.getvalue() == "Compiling x: done in 0 s\n"
