"""Capture during cached generation of a batch: exactly the requested rows/positions/steps, bounded footprint
(stop with a warning, or ring), and captured tensors that never change afterwards."""

from __future__ import annotations

import warnings

import pytest
import torch

from exllamav2.interventions import Target, add_capture, wrapped_slots
from exllamav2.module import Intervention

from test_interventions_models import generate, prompts, tiny  # noqa: F401  (fixture)

PROMPT, STEPS = 10, 64


def test_capture_64_token_batch_generation(tiny):
    model = tiny
    ids = prompts(model, 3, PROMPT, seed=11)
    pts = ["blocks.1.resid_post", "blocks.0.mlp.pre_down"]
    want_steps = [0, 10, 63]
    with add_capture(model, pts, rows=[0, 2], steps=want_steps) as cap, \
            add_capture(model, "blocks.1.resid_post", policy="stop") as full:
        toks, _ = generate(model, ids, STEPS)
    assert not wrapped_slots(model)
    seq = torch.cat([ids, toks[:, :-1]], 1)  # every token that went through the model
    ref = {}
    with add_capture(model, pts) as refcap:
        model.forward(seq)
    for p in pts:
        ref[p] = refcap[p].dense()
    for p in pts:
        r = cap[p]
        width = model.config.intermediate_size if p.endswith("pre_down") else model.config.hidden_size
        assert r.values.shape == (2 * len(want_steps), width)
        assert sorted(zip(r.rows.tolist(), r.steps.tolist(), r.positions.tolist())) == \
            sorted((row, k, PROMPT - 1 + k) for row in (0, 2) for k in want_steps)
        assert torch.equal(r.cache_index, r.positions)
        for row in (0, 2):
            pos, vals = r.for_row(row)
            assert pos.tolist() == [PROMPT - 1 + k for k in want_steps]
            torch.testing.assert_close(vals, ref[p][row, pos], atol=1e-4, rtol=0)
        assert r.dense().shape == (2, len(want_steps), width)
    everything = full["blocks.1.resid_post"]
    assert everything.dense().shape == (3, PROMPT - 1 + STEPS, model.config.hidden_size)
    assert (everything.steps == -1).sum() == 3 * (PROMPT - 1)
    torch.testing.assert_close(everything.dense(), ref["blocks.1.resid_post"], atol=1e-4, rtol=0)


def test_bounded_stop_warns_and_keeps_first(tiny):
    model = tiny
    ids = prompts(model, 2, 6, seed=12)
    with add_capture(model, "blocks.0.resid_post", max_positions=7, policy="stop") as cap:
        with pytest.warns(RuntimeWarning, match="reached its limit"):
            generate(model, ids, 8)
    r = cap["blocks.0.resid_post"]
    assert len(r) == 7 and cap.truncated
    assert r.steps.tolist() == [-1] * 7  # the prompt (2 rows x 5 positions) came first: row 0 then row 1
    assert r.rows.tolist() == [0] * 5 + [1] * 2
    d = model.config.hidden_size
    with add_capture(model, "blocks.0.resid_post", max_positions=None, max_bytes=d * 4 * 3 + 5) as cap2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            generate(model, ids, 4)
    assert len(cap2["blocks.0.resid_post"]) == 3 and cap2.nbytes() <= d * 4 * 3 + 5


def test_bounded_ring_keeps_latest(tiny):
    model = tiny
    ids = prompts(model, 2, 6, seed=13)
    with add_capture(model, "blocks.0.resid_post", max_positions=5, policy="ring") as ring, \
            add_capture(model, "blocks.0.resid_post", max_positions=None) as full:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            generate(model, ids, 8)
    r, f = ring["blocks.0.resid_post"], full["blocks.0.resid_post"]
    assert len(r) == 5 and ring.dropped == len(f) - 5 and not ring.truncated
    assert torch.equal(r.values, f.values[-5:]) and torch.equal(r.steps, f.steps[-5:])
    assert r.steps.tolist() == [5, 6, 6, 7, 7]


def test_captured_tensors_never_change(tiny):
    model = tiny
    ids = prompts(model, 1, 6, seed=14)
    with add_capture(model, ["embed", "blocks.0.resid_post"]) as ref:
        model.forward(ids)
    with add_capture(model, ["embed", "blocks.0.resid_post"]) as cap:
        # someone else's hook, added after the capture, overwrites the tensors in place
        idx = next(i for i, m in enumerate(model.modules) if isinstance(m, Intervention) and i > 0)
        model.modules[idx] = Intervention(model.modules[idx], post_forward=lambda h, *a, **k: h.mul_(0.0))
        try:
            model.forward(ids)
        finally:
            model.modules[idx] = model.modules[idx].inner
        snapshot = {p: cap[p].values.clone() for p in cap.points}
        model.forward(ids)  # more calls append but never touch earlier entries
    for p in cap.points:
        assert torch.equal(cap[p].values[:len(snapshot[p])], snapshot[p])
        assert torch.equal(snapshot[p], ref[p].values)


def test_capture_argument_errors(tiny):
    with pytest.raises(ValueError, match="policy"):
        add_capture(tiny, "embed", policy="drop")
    with pytest.raises(ValueError, match="max_positions"):
        add_capture(tiny, "embed", max_positions=0)
    with pytest.raises(ValueError, match="listed twice"):
        add_capture(tiny, ["embed", "embed"])
    with pytest.raises(KeyError, match="holds no point"):
        with add_capture(tiny, "embed", target=Target(positions="prompt")) as c:
            c["final_norm"]
    assert not wrapped_slots(tiny)
