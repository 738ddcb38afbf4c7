"""Randomized config fuzz of dense safetensors models against HF transformers (bench/fuzz_dense_configs.py).

Fast set: one case per architecture at realistic attention shapes (head_dim 64, GQA, hidden 256, so the CPU C++
attention / GEMV kernels and the eager decode short path are taken), fixed seeds; each case checks fp32 logits
(full and prefill + cached decode) vs HF, our default backend vs our torch backend, bf16 vs HF, and greedy tokens
of three jobs batched through ExLlamaV2DynamicGenerator vs HF greedy. Regression tests for what the fuzz found.
The broad randomized sweep runs with `pytest -m slow`."""

from __future__ import annotations

import os
import random
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import fuzz_dense_configs as fuzz  # noqa: E402

ARCHS = fuzz.all_architectures()
SHAPE = (4, 2, 64, 256)  # heads, kv heads, head_dim, hidden (where the family takes an explicit head_dim)


def _assert_ok(res):
    assert not res.exception, res.exception
    assert res.ok, "\n".join([res.case.describe()] + [str(f) for f in res.findings])
    # guards against vacuous comparisons: every check ran, and logits have spread
    assert res.errors["spread"][0] > 0.05
    names = " ".join(res.errors)
    for what in ("fp32 default: full forward", "fp32 default: prefill + cached decode", "default vs torch backend",
                 "bf16 default: full forward", "fp32 dynamic generator greedy", "bf16 dynamic generator greedy"):
        assert what in names, (what, sorted(res.errors))


def test_every_architecture_has_a_sampler():
    for i, arch in enumerate(ARCHS):
        case = fuzz.sample_case(random.Random(i), arch, i)
        assert case.arch == arch


# one architecture per family in the fast set; the rest of the architectures run in the slow set
FAST = ["LlamaForCausalLM", "Qwen3ForCausalLM", "GraniteForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
        "Phi3ForCausalLM", "PhiForCausalLM", "Cohere2ForCausalLM", "Qwen2MoeForCausalLM"]


@pytest.mark.parametrize("arch", [a if a in FAST else pytest.param(a, marks=pytest.mark.slow) for a in ARCHS])
def test_fuzz_case_head_dim_64(arch, tmp_path):
    seed = 1000 + ARCHS.index(arch)
    case = fuzz.sample_case(random.Random(seed), arch, seed, shape=SHAPE)
    case.prompt_len, case.decode_steps = 33, 12
    _assert_ok(fuzz.run_case(case, str(tmp_path)))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [11, 12, 13])
def test_fuzz_sweep(seed, tmp_path):
    bad = []
    for case in fuzz.generate_cases(seed, 2 * len(ARCHS), None):
        res = fuzz.run_case(case, str(tmp_path))
        if not res.ok:
            bad.append("\n".join([case.describe()] + [str(f) for f in res.findings] + [res.exception]))
    assert not bad, "\n\n".join(bad)


# ------------------------------------------------------------------------------------------------ regressions

def _case(arch, kwargs, seed=0, **kw):
    import transformers as tf  # noqa: F401
    base = fuzz.sample_case(random.Random(seed), arch, seed, shape=SHAPE)
    base.kwargs.update(kwargs)
    for k, v in kw.items():
        setattr(base, k, v)
    return base


def test_gemma3_conditional_generation_ignores_text_final_softcap(tmp_path):
    """HF's Gemma3ForConditionalGeneration applies no final logit softcap even where text_config sets one (its
    Gemma3ForCausalLM does): ours follows HF, so logits above the cap come through."""
    case = _case("Gemma3ForConditionalGeneration", dict(final_logit_softcapping=2.0, attn_logit_softcapping=None))
    res = fuzz.run_case(case, str(tmp_path), checks=("fp32",))
    assert res.ok, [str(f) for f in res.findings] or res.exception
    from exllamav2 import ExLlamaV2Config
    hf = fuzz.build_hf(case)
    path = fuzz.save_ours(case, hf, str(tmp_path / "m"))
    assert ExLlamaV2Config(path).final_logit_softcapping is None
    # the causal-LM model keeps its cap
    case2 = _case("Gemma3ForCausalLM", dict(final_logit_softcapping=2.0), seed=1)
    hf2 = fuzz.build_hf(case2)
    path2 = fuzz.save_ours(case2, hf2, str(tmp_path / "m2"))
    assert ExLlamaV2Config(path2).final_logit_softcapping == 2.0


def _length_rope_model(rope: str, seed: int, tmp_path):
    """A tiny Llama with longrope (original_max_position_embeddings 24) or dynamic NTK (max positions 24), saved
    with a word tokenizer: (hf model, folder)."""
    half = 32
    rs = ({"rope_type": "longrope", "long_factor": [1.0 + 1.2 * i / half for i in range(half)],
           "short_factor": [1.0 + 0.1 * i / half for i in range(half)], "original_max_position_embeddings": 24}
          if rope == "longrope" else {"rope_type": "dynamic", "factor": 4.0})
    case = fuzz.Case("LlamaForCausalLM", "LlamaForCausalLM", "LlamaConfig", dict(
        vocab_size=513, hidden_size=256, intermediate_size=200, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, max_position_embeddings=128 if rope == "longrope" else 24,
        rope_scaling=rs), seed=seed)
    hf = fuzz.build_hf(case)
    path = fuzz.save_ours(case, hf, str(tmp_path))
    fuzz.save_word_tokenizer(path, 513)
    return hf, path


@pytest.mark.parametrize("rope", ["longrope", "dynamic"])
def test_length_dependent_rope_is_per_job_in_the_dynamic_generator(rope, tmp_path):
    """A short job's greedy tokens must not depend on a long job packed into the same steps: longrope / dynamic
    NTK pick their frequencies from each sequence's own length (as HF and as the job alone), not the batch's
    longest (before the fix a 5-token job switched to the long factors whenever a 40-token job shared its steps)."""
    hf, path = _length_rope_model(rope, 3, tmp_path)
    g = torch.Generator().manual_seed(5)
    long_job, short_job = torch.randint(0, 513, (1, 40), generator=g), torch.randint(0, 513, (1, 5), generator=g)
    ref, _ = fuzz.hf_greedy(hf, short_job, 30)  # crosses original_max_position_embeddings / max_position_embeddings
    model = fuzz.load_ours(path, "float32")
    alone = fuzz.ours_dynamic_greedy(model, [short_job], 30, chunk=256)[0]
    together = fuzz.ours_dynamic_greedy(model, [long_job, short_job], 30, chunk=256)[1]
    assert alone == ref
    assert together == alone


@pytest.mark.parametrize("rope", ["longrope", "dynamic"])
def test_chunked_prefill_takes_length_dependent_rope_from_the_whole_prompt(rope, tmp_path):
    """model.forward cuts a long prompt into max_input_len chunks; with longrope / dynamic NTK every chunk must be
    rotated with the frequencies of the whole prompt's length, as HF's one pass is (before, a first chunk shorter
    than original_max_position_embeddings kept the short factors while later chunks took the long ones)."""
    from exllamav2 import ExLlamaV2Cache
    hf, path = _length_rope_model(rope, 4, tmp_path)
    ids = torch.randint(0, 513, (1, 60), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = hf(ids).logits.float()
    for chunk in (60, 16, 7):
        model = fuzz.load_ours(path, "float32", max_input_len=chunk)
        cache = ExLlamaV2Cache(model, max_seq_len=model.config.max_seq_len)
        out = model.forward(ids, cache)
        err = (out - ref).abs().max().item() / ref.abs().max().item()
        assert err < 2e-4, (chunk, err)


@pytest.mark.parametrize("rope", ["longrope", "dynamic"])
def test_dynamic_generator_prefills_length_dependent_rope_by_the_whole_prompt(rope, tmp_path):
    """The dynamic generator's chunked prefill rotates each chunk with the whole prompt's frequencies (HF's one
    pass), and a prompt's prefix pages computed at other frequencies (a shorter prompt's, run before in the same
    generator) are not reused."""
    from exllamav2 import ExLlamaV2Cache
    from exllamav2.generator.dynamic import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob
    from exllamav2.generator.sampler import ExLlamaV2Sampler
    from exllamav2.tokenizer import ExLlamaV2Tokenizer
    hf, path = _length_rope_model(rope, 5, tmp_path)
    prompt = torch.randint(0, 513, (1, 40), generator=torch.Generator().manual_seed(7))
    ref, _ = fuzz.hf_greedy(hf, prompt, 12)
    model = fuzz.load_ours(path, "float32")
    assert fuzz.ours_dynamic_greedy(model, [prompt], 12, chunk=16)[0] == ref
    gen = ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, 1, 512), ExLlamaV2Tokenizer(model.config),
                                    page_size=16, max_chunk_size=16)
    for ids in (prompt[:, :20], prompt):  # the first leaves a 16-token page of the shared prefix
        job = ExLlamaV2DynamicJob(ids, 12, gen_settings=ExLlamaV2Sampler.Settings.greedy())
        gen.enqueue(job)
        while gen.num_remaining_jobs():
            gen.iterate()
    assert list(job.new_token_ids) == ref
