"""The same answer alone or in a crowd: 16 concurrent greedy requests return exactly what each returns alone, in
the dynamic generator and through the server (official `openai` client), on SmolLM2 in its default weights (the
GGUF's int4 blocks packed, bf16 activations: invariant as they are). Dense bf16 weights are invariant with
ops.set_batch_invariant (serve --deterministic): the bf16 GEMV then serves every batch size (ops/cpu/gemv_linear.py),
where otherwise a request alone (1 row, GEMV) and among 16 (16 rows, oneDNN) is rounded differently; float32 and
float16 dense weights then run each row alone through torch's GEMM (ops/cpu/linear.py)."""

from __future__ import annotations

import argparse
import concurrent.futures as cf

import openai
import pytest
import torch

from exllamav2 import ExLlamaV2Cache, ops
from exllamav2.generator.dynamic import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob
from exllamav2.generator.dynamic_async import ExLlamaV2DynamicGeneratorAsync
from exllamav2.generator.sampler import ExLlamaV2Sampler
from exllamav2.server import ServerEngine, start_in_thread
from test_dynamic_tiny import build_tiny_dir, load_tiny

PROMPTS = ["Write a haiku about the sea.", "What is 17 times 23?", "Name three prime numbers.",
           "Explain gravity to a child.", "Give me a recipe for pancakes.", "What is the capital of Peru?",
           "Tell me a joke about cats.", "How do airplanes fly?", "List four colours of the rainbow.",
           "Why is the sky blue?", "Translate 'good morning' into French.", "What does a compiler do?",
           "Describe a sunset in one sentence.", "How many legs does a spider have?", "Suggest a name for a dog.",
           "What is photosynthesis?"]


def _mode(value):
    from exllamav2.ops import dispatch
    before = dispatch._batch_invariant
    ops.set_batch_invariant(value)
    try:
        yield value
    finally:
        ops.set_batch_invariant(before)


@pytest.fixture
def batch_invariant():
    """Invariance asked for explicitly (serve --deterministic)."""
    yield from _mode(True)


@pytest.fixture(params=[None, True], ids=["default", "explicit"])
def invariant_mode(request):
    """The default (auto: every CPU kernel with the C++ kernels built) and invariance asked for explicitly."""
    yield from _mode(request.param)


def run_jobs(model, tok, prompts, n=16, chat=True, logits=False):
    """Each job's new tokens (or, with `logits`, the logits it sampled from, stacked), all jobs run together."""
    gen = ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, 1, 4096), tok, page_size=64)
    jobs = []
    for i, p in enumerate(prompts):
        text = tok.apply_chat_template([{"role": "user", "content": p}]) if chat else p
        jobs.append(ExLlamaV2DynamicJob(tok.encode(text, encode_special_tokens=chat), n, identifier=i,
                                        gen_settings=ExLlamaV2Sampler.Settings.greedy(), stop_conditions=[],
                                        return_logits=logits))
    gen.enqueue(jobs)
    out: dict = {i: [] for i in range(len(jobs))}
    while gen.num_remaining_jobs():
        for r in gen.iterate():
            if logits and r["stage"] == "streaming" and "logits" in r:
                out[r["identifier"]].append(r["logits"][0])
    if logits:
        return [torch.cat(out[i]) for i in range(len(jobs))]
    return [j.new_token_ids for j in jobs]


def assert_alone_equals_together(model, tok, n=16, chat=True, logits=False):
    together = run_jobs(model, tok, PROMPTS, n, chat, logits)
    alone = [run_jobs(model, tok, [p], n, chat, logits)[0] for p in PROMPTS]
    same = torch.equal if logits else (lambda a, b: a == b)
    differ = [i for i in range(len(PROMPTS)) if not same(alone[i], together[i])]
    assert not differ, f"prompts {differ} gave other {'logits' if logits else 'tokens'} among 16 than alone"


def test_16_greedy_jobs_alone_equal_together(smollm2_default):
    assert_alone_equals_together(*smollm2_default)


def test_server_16_concurrent_requests_equal_one_at_a_time(smollm2_default):
    model, tok = smollm2_default
    gen = ExLlamaV2DynamicGeneratorAsync(model, ExLlamaV2Cache(model, 1, 4096), tok, max_batch_size=16,
                                         page_size=64)
    engine = ServerEngine(model, tok, gen, "smollm2", max_queue=64)
    srv = start_in_thread(engine)
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=600)

        def ask(p):
            r = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": p}],
                                               max_tokens=16, temperature=0, seed=7)
            return r.choices[0].message.content

        one_by_one = [ask(p) for p in PROMPTS]
        with cf.ThreadPoolExecutor(16) as ex:
            concurrent = list(ex.map(ask, PROMPTS))
        assert all(one_by_one)
        differ = [i for i in range(len(PROMPTS)) if one_by_one[i] != concurrent[i]]
        assert not differ, f"requests {differ} answered otherwise among 16 concurrent ones"
    finally:
        srv.stop()
        engine.close()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("k", [256, 100, 2100])  # 2100: the k loop in parts (csrc/bf16_gemv.cpp)
def test_dense_gemv_rows_do_not_depend_on_the_batch(invariant_mode, dtype, k):
    from exllamav2.ops.cpu import kernels
    from exllamav2.ops.cpu.gemv_linear import GEMV_MAX_ROWS, DenseGemvKernel

    if not kernels.ready(progress=False):
        pytest.skip("the C++ CPU kernels are not available here")
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(384, k, generator=g) * 0.05).to(dtype)
    b = torch.randn(384, generator=g).to(dtype)
    x = torch.randn(4 * GEMV_MAX_ROWS + 3, k, generator=g).to(dtype)
    kernel = DenseGemvKernel(w, b)
    ref = x.double() @ w.double().T + b.double()
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    before = kernels.isa()
    try:
        for isa in ("avx512", "avx2") if before == "avx512" else (before,):
            kernels.set_isa(isa)
            alone = torch.cat([kernel(x[i:i + 1]) for i in range(x.shape[0])])
            for m in (1, GEMV_MAX_ROWS, GEMV_MAX_ROWS + 1, x.shape[0]):
                assert torch.equal(kernel(x[:m]), alone[:m]), f"{isa}: a row changed in a call of {m} rows"
                assert torch.equal(kernel(x[3:m + 3]), alone[3:m + 3]), f"{isa}: a row changed with an offset, {m} rows"
            assert ((alone.double() - ref).abs().max() / ref.abs().max()).item() < tol, isa
    finally:
        kernels.set_isa(before)


def test_opting_out_of_invariance_gives_dense_prefill_to_onednn():
    """set_batch_invariant(False): calls above GEMV_MAX_ROWS rows are F.linear's (the fastest per row count), and
    their rows may round otherwise than alone; the default keeps them on the GEMV."""
    from exllamav2.ops.cpu import kernels
    from exllamav2.ops.cpu.gemv_linear import GEMV_MAX_ROWS, DenseGemvKernel

    if not kernels.ready(progress=False):
        pytest.skip("the C++ CPU kernels are not available here")
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(64, 96, generator=g), torch.randn(GEMV_MAX_ROWS + 5, 96, generator=g)
    kernel = DenseGemvKernel(w, None)
    for mode in _mode(False):
        assert torch.equal(kernel(x), torch.nn.functional.linear(x, w))
    assert torch.equal(kernel(x), kernels.dense_gemv(x, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dense_float_rows_do_not_depend_on_the_batch(batch_invariant, dtype):
    """float32/float16 dense weights run torch's GEMM, whose rounding follows the row count: in batch-invariant
    mode each row runs alone (ops/cpu/linear.py: DenseKernel), so a row's bits do not depend on the call."""
    from exllamav2.ops.cpu.linear import DenseKernel

    g = torch.Generator().manual_seed(1)
    w = (torch.randn(384, 256, generator=g) * 0.05).to(dtype)
    x = torch.randn(33, 256, generator=g).to(dtype)
    kernel = DenseKernel(w, None)
    alone = torch.cat([kernel(x[i:i + 1]) for i in range(x.shape[0])])
    for m in (2, 8, 9, 33):
        assert torch.equal(kernel(x[:m]), alone[:m]), f"a row changed in a call of {m} rows"
        assert torch.equal(kernel(x[1:m]), alone[1:m]), f"a row changed with an offset in a call of {m - 1} rows"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_dense_model_invariant(tmp_path, invariant_mode, dtype):
    """A tiny dense Llama: 16 jobs together compute, bit for bit, the logits each computes alone, by default and
    with invariance asked for (with it switched off, 16 decode rows go through oneDNN and one row through the
    GEMV, and they differ)."""
    model, tok = load_tiny(build_tiny_dir(tmp_path / "tiny"), dtype=dtype)
    assert_alone_equals_together(model, tok, n=6, chat=False, logits=True)


@pytest.mark.slow
def test_smollm2_dense_bf16_invariant_with_the_option(smollm2_gguf, batch_invariant):
    from exllamav2 import ExLlamaV2, ExLlamaV2Config, ExLlamaV2Tokenizer

    cfg = ExLlamaV2Config(smollm2_gguf)
    cfg.max_seq_len = 512
    cfg.gguf_dequantize = True
    model = ExLlamaV2(cfg)
    model.load()
    assert_alone_equals_together(model, ExLlamaV2Tokenizer(cfg))


def test_serve_deterministic_flag():
    from exllamav2.commands import serve

    parser = argparse.ArgumentParser()
    serve.add_parser(parser.add_subparsers())
    assert parser.parse_args(["serve", "--deterministic"]).deterministic
    assert not parser.parse_args(["serve"]).deterministic
    args = parser.parse_args(["serve", "--deterministic", "--replicas", "2"])
    args.ray_address = None
    if serve.missing_extras():
        pytest.skip("the server extra is not installed")
    try:
        import ray.serve  # noqa: F401
    except ImportError:
        pytest.skip("ray is not installed")
    with pytest.raises(SystemExit, match="--deterministic is not passed to --replicas"):
        serve.run(args)
