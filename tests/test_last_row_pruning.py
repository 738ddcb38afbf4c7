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
