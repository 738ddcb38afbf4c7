"""Per-job interventions through the dynamic generator: a job's edits act only on its own tokens of the packed row,
with positions and decode steps counted per job. Oracle: the same specs registered through the padded-batch API
(`register_specs`) on a plain model.forward loop in the ExLlamaV2 style (prefill prompt[:-1], then one token per
step, so decode step k gives new token k). Tiny random Llama in fp32, greedy."""

from __future__ import annotations

import pytest
import torch

from exllamav2 import ExLlamaV2Cache
from exllamav2.generator.dynamic import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob
from exllamav2.generator.sampler import ExLlamaV2Sampler
from exllamav2.interventions import (InterventionRequestError, TokenStreams, from_request, model_state,
                                     register_specs, wrapped_slots)
from test_dynamic_tiny import PAGE, tiny  # noqa: F401  (fixture)

HIDDEN = 64
N_NEW = 10


def steer(seed: int, scale: float = 3.0) -> list[float]:
    return (torch.randn(HIDDEN, generator=torch.Generator().manual_seed(seed)) * scale).tolist()


SPEC_SETS = {
    "add_generated": [{"point": "blocks.0.resid_post", "edit": "add", "vector": steer(1), "positions": "generated"}],
    "add_all_and_zero_prompt": [
        {"point": "blocks.1.resid_pre", "edit": "add", "vector": steer(2, 2.0)},
        {"point": "blocks.0.mlp_out", "edit": "zero", "positions": "prompt"}],
    "zero_steps_and_positions": [
        {"point": "blocks.1.attn_out", "edit": "zero", "steps": [0, 2, 3]},
        {"point": "blocks.0.resid_mid", "edit": "replace", "vector": steer(3), "positions": [1, 4, 15, 22]},
        {"point": "blocks.1.mlp.pre_down", "edit": "scale", "scale": -2.0, "steps": [1, 5]}],
}


def prompt_ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(100, 49000, (1, n), generator=torch.Generator().manual_seed(seed))


def reference(model, ids: torch.Tensor, n_new: int, specs=(), file_root: str | None = None) -> list[int]:
    """Padded-batch oracle: specs registered with register_specs around a plain greedy forward loop."""
    specs = from_request(model, list(specs), file_root=file_root)
    cache = ExLlamaV2Cache(model, 1, ids.shape[1] + n_new + 1)
    out = []
    with register_specs(model, specs, file_root=file_root):
        if ids.shape[1] > 1:
            model.forward(ids[:, :-1], cache, preprocess_only=True)
        tok = ids[:, -1:]
        for _ in range(n_new):
            t = int(model.forward(tok, cache)[0, -1].argmax())
            out.append(t)
            tok = torch.tensor([[t]])
    assert not wrapped_slots(model)
    return out


def make_generator(model, tok, chunk: int = 8):
    cache = ExLlamaV2Cache(model, 1, 16 * PAGE)
    return ExLlamaV2DynamicGenerator(model, cache, tok, max_batch_size=4, max_chunk_size=chunk, page_size=PAGE)


def job(ids, specs=None, n_new=N_NEW, identifier=None):
    return ExLlamaV2DynamicJob(ids, n_new, gen_settings=ExLlamaV2Sampler.Settings.greedy(), stop_conditions=[],
                               interventions=specs, identifier=identifier)


def run_jobs(gen, jobs, on_step=None) -> list[list[int]]:
    gen.enqueue(jobs)
    while gen.num_remaining_jobs():
        gen.iterate()
        if on_step is not None:
            on_step(gen)
    return [j.new_token_ids for j in jobs]


def test_token_streams_classify_tokens_per_stream():
    # stream a: prompt of 5, 3 cached, feeds 4 (positions 3..6 -> prompt, step 0, 1, 2); stream b: decoding at 9
    st = TokenStreams(["a", "b"], past_lens=[3, 9], q_lens=[4, 1], prompt_lens=[5, 7])
    assert st.positions.tolist() == [3, 4, 5, 6, 9]
    assert st.steps.tolist() == [-1, 0, 1, 2, 3]
    assert st.span("b") == (4, 5) and st.span("c") is None
    with pytest.raises(ValueError, match="distinct"):
        TokenStreams(["a", "a"], [0, 0], [1, 1], [1, 1])


@pytest.mark.parametrize("name", list(SPEC_SETS))
def test_steered_job_beside_plain_job(tiny, name):
    """Two concurrent jobs with chunked prefill (prompts split over steps and packed with the other job's decode
    tokens): the plain job equals its solo run, the steered one equals the padded-batch reference."""
    _, model, tok = tiny
    specs = SPEC_SETS[name]
    plain_ids, steered_ids = prompt_ids(13, 1), prompt_ids(27, 2)
    solo = run_jobs(make_generator(model, tok), [job(plain_ids)])[0]
    ref_steered = reference(model, steered_ids, N_NEW, specs)
    assert ref_steered != reference(model, steered_ids, N_NEW), "the edit must change the output"

    gen = make_generator(model, tok)
    wrapped_while_running = []
    out = run_jobs(gen, [job(plain_ids), job(steered_ids, specs)],
                   on_step=lambda g: wrapped_while_running.append(len(wrapped_slots(model))))
    assert out[0] == solo
    assert out[1] == ref_steered
    assert max(wrapped_while_running) > 0
    assert not wrapped_slots(model) and model_state(model).users == 0


def test_two_jobs_with_different_edits(tiny):
    _, model, tok = tiny
    a_ids, b_ids = prompt_ids(9, 3), prompt_ids(18, 4)
    a_specs, b_specs = SPEC_SETS["add_generated"], SPEC_SETS["zero_steps_and_positions"]
    out = run_jobs(make_generator(model, tok, chunk=6), [job(a_ids, a_specs), job(b_ids, b_specs)])
    assert out == [reference(model, a_ids, N_NEW, a_specs), reference(model, b_ids, N_NEW, b_specs)]
    assert not wrapped_slots(model)


def test_no_interventions_wraps_nothing(tiny):
    _, model, tok = tiny
    seen = []
    run_jobs(make_generator(model, tok), [job(prompt_ids(7, 5)), job(prompt_ids(11, 6))],
             on_step=lambda g: seen.append((len(wrapped_slots(model)), model_state(model).users)))
    assert seen and all(s == (0, 0) for s in seen)


def test_cancel_removes_hooks(tiny):
    _, model, tok = tiny
    gen = make_generator(model, tok)
    j = job(prompt_ids(10, 7), SPEC_SETS["add_all_and_zero_prompt"], n_new=50)
    gen.enqueue(j)
    for _ in range(3):
        gen.iterate()
    assert wrapped_slots(model)
    gen.cancel(j)
    assert not wrapped_slots(model) and model_state(model).users == 0
    pt = gen.page_table
    assert pt.num_free_pages() == pt.num_pages


def test_prefix_pages_not_shared_with_edited_jobs(tiny):
    """A job whose edits touch its prompt computes its own prompt K/V (no reuse) and never publishes pages that
    hold edited K/V, so a later plain job with the same prompt still equals its solo run."""
    _, model, tok = tiny
    ids = prompt_ids(3 * PAGE + 5, 8)
    specs = SPEC_SETS["add_all_and_zero_prompt"]
    gen = make_generator(model, tok, chunk=64)
    plain_first = run_jobs(gen, [job(ids)])[0]
    assert gen.page_table.num_cached_pages() == 3
    cached_before = gen.num_cached_tokens
    steered = run_jobs(gen, [job(ids, specs)])[0]
    assert gen.num_cached_tokens == cached_before  # nothing reused
    assert steered == reference(model, ids, N_NEW, specs)
    assert run_jobs(gen, [job(ids)])[0] == plain_first
    # an edit on generated tokens only leaves the prompt K/V untouched, so the job may reuse the cached prefix
    gen_only = SPEC_SETS["add_generated"]
    out = run_jobs(gen, [job(ids, gen_only)])[0]
    assert gen.num_cached_tokens > cached_before
    assert out == reference(model, ids, N_NEW, gen_only)


def test_invalid_specs_fail_at_enqueue(tiny):
    _, model, tok = tiny
    gen = make_generator(model, tok)
    with pytest.raises(InterventionRequestError, match=r"interventions\[0\]\.point"):
        gen.enqueue(job(prompt_ids(5, 9), [{"point": "blocks.9.resid_post", "edit": "zero"}]))
    with pytest.raises(InterventionRequestError, match="64 wide"):
        gen.enqueue(job(prompt_ids(5, 9), [{"point": "embed", "edit": "add", "vector": [1.0, 2.0]}]))
    with pytest.raises(ValueError, match="interventions must be a list"):
        job(prompt_ids(5, 9), "steer")
    assert not gen.num_remaining_jobs() and not wrapped_slots(model)
