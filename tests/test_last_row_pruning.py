"""A prefill that wants the last position's logits (last_id_only) or none (preprocess_only) runs the modules after
the last KV layer's attention on the last row only (model.ExLlamaV2._pruned_layer): the same logits and cache as
the whole pass, and every row where something could look at them."""

from __future__ import annotations

import torch

from exllamav2 import ExLlamaV2Cache
from exllamav2.module import Intervention


def _rows_seen(model, idx):
    """Wrap modules[idx].forward to record the row count of each call; returns (record list, undo)."""
    m = model.modules[idx]
    seen = []
    inner = m.forward

    def forward(x, *a, **kw):
        seen.append(x.shape[1])
        return inner(x, *a, **kw)

    m.forward = forward
    return seen, lambda: m.__dict__.pop("forward")


def _prompt(n, seed=0):
    return torch.randint(100, 20000, (1, n), generator=torch.Generator().manual_seed(seed))


def test_last_id_only_equals_the_whole_pass(smollm2_default):
    model, _ = smollm2_default
    ids = _prompt(97)
    cache = ExLlamaV2Cache(model, max_seq_len=256)
    full = model.forward(ids, cache)[:, -1:]
    kv = [t[:, :97].clone() for t in cache.key_states + cache.value_states]
    last_mlp = model.last_kv_layer_idx + 1
    seen, undo = _rows_seen(model, last_mlp)
    try:
        cache.current_seq_len = 0
        last = model.forward(ids, cache, last_id_only=True)
    finally:
        undo()
    assert seen == [1]  # the last layer's MLP ran on one row
    # the GGUF kernels compute each row alone, so the pruned pass gives the same bits
    assert torch.equal(last, full)
    assert all(torch.equal(a, b[:, :97]) for a, b in zip(kv, cache.key_states + cache.value_states))
    assert cache.current_seq_len == 97
    # the next token decodes from the same cache to the same logits
    nxt = full.argmax(-1)
    step = model.forward(nxt, cache)
    cache.current_seq_len = 0
    ref = model.forward(torch.cat([ids, nxt], 1), cache)[:, -1:]
    assert torch.equal(step, ref)


def test_preprocess_only_writes_the_same_cache(smollm2_default):
    model, _ = smollm2_default
    ids = _prompt(50, seed=1)
    cache = ExLlamaV2Cache(model, max_seq_len=256)
    model.forward(ids, cache)
    kv = [t[:, :50].clone() for t in cache.key_states + cache.value_states]
    cache.current_seq_len = 0
    assert model.forward(ids, cache, preprocess_only=True) is None
    assert cache.current_seq_len == 50
    assert all(torch.equal(a, b[:, :50]) for a, b in zip(kv, cache.key_states + cache.value_states))


def test_every_row_where_something_looks(smollm2_default):
    model, _ = smollm2_default
    ids = _prompt(40, seed=2)
    idx = model.last_kv_layer_idx + 1
    cache = ExLlamaV2Cache(model, max_seq_len=256)
    seen = []
    inner = model.modules[idx]
    model.modules[idx] = Intervention(inner, pre_forward=lambda h, *a, **k: (seen.append(h.shape[1]), h)[1])
    try:
        model.forward(ids, cache, last_id_only=True)
    finally:
        model.modules[idx] = inner
    assert seen == [40]  # an intervention sees the whole sequence
    cache.current_seq_len = 0
    r = model.forward_chunk(ids, cache, last_id_only=True, extract_state_indices=[idx])
    assert r["states"][idx].shape[1] == 40 and r["logits"].shape[1] == 1


def test_the_dynamic_generator_prunes_to_its_sampled_rows(smollm2_default, monkeypatch):
    """Packed steps (prompt chunks beside decode rows) run the last MLP on the rows they sample only, and give the
    same tokens and probabilities as the unpruned forward."""
    from exllamav2.generator.dynamic import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob
    from exllamav2.generator.sampler import ExLlamaV2Sampler
    model, tok = smollm2_default

    def run():
        cache = ExLlamaV2Cache(model, 1, 2048)
        gen = ExLlamaV2DynamicGenerator(model, cache, tok, page_size=256, max_chunk_size=64)
        prompts = ["The capital of France is", "List three colours: red,",
                   "Once upon a time, in a land far away, there lived a"]
        for i, p in enumerate(prompts):
            gen.enqueue(ExLlamaV2DynamicJob(input_ids=tok.encode(p), max_new_tokens=12, identifier=i,
                                            gen_settings=ExLlamaV2Sampler.Settings.greedy(), return_probs=True))
        out = {}
        while gen.num_remaining_jobs():
            for r in gen.iterate():
                if r.get("stage") == "streaming":
                    o = out.setdefault(r["identifier"], [[], []])
                    if r.get("token_ids") is not None:
                        o[0] += r["token_ids"].flatten().tolist()
                    if r.get("token_probs") is not None:
                        o[1] += r["token_probs"].flatten().tolist()
        return out

    seen, undo = _rows_seen(model, model.last_kv_layer_idx + 1)
    try:
        pruned = run()
    finally:
        undo()
    monkeypatch.setattr(type(model), "last_rows_layer", lambda self: -1)
    seen_full, undo = _rows_seen(model, model.last_kv_layer_idx + 1)
    try:
        full = run()
    finally:
        undo()
    assert sum(seen) < sum(seen_full)  # the prompts' rows were left out
    assert pruned == full and all(len(v[0]) == 12 for v in full.values())
