"""Edit functions and their targeting (prompt/generated positions, rows, decode steps) across cached decoding."""

from __future__ import annotations

import pytest
import torch

from exllamav2.interventions import (AddVector, Clamp, Edit, ProjectOut, Replace, Scale, Selection, Target, Zero,
                                     add_capture, add_edit)
from exllamav2.interventions.targets import CallInfo

from test_interventions_models import generate, prompts, tiny  # noqa: F401  (fixture)


def sel(b, s, mask=None, past=0):
    return Selection(mask, CallInfo(past_len=past, seq_len=s, batch_size=b), b, s, torch.device("cpu"))


def test_edit_math():
    torch.manual_seed(0)
    h = torch.randn(2, 3, 8)
    v = torch.randn(8)
    u = v / v.norm()
    assert torch.equal(AddVector(v, 2.0)(h, sel(2, 3)), h + 2 * v)
    assert torch.equal(AddVector(v, 0.0)(h, sel(2, 3)), h)
    p = ProjectOut(v)(h, sel(2, 3))
    assert (p @ u).abs().max() < 1e-5
    torch.testing.assert_close(p + (h @ u).unsqueeze(-1) * u, h)
    assert torch.equal(Clamp(-0.1, 0.2)(h, sel(2, 3)), h.clamp(-0.1, 0.2))
    c = Clamp(min=1.0, direction=v)(h, sel(2, 3))
    assert ((c @ u) >= 1.0 - 1e-5).all()
    torch.testing.assert_close(c - (c @ u).unsqueeze(-1) * u, h - (h @ u).unsqueeze(-1) * u)
    assert torch.equal(Scale(-2.0)(h, sel(2, 3)), -2 * h)
    assert torch.equal(Zero()(h, sel(2, 3)), torch.zeros_like(h))
    mask = torch.tensor([[True, False, False], [False, False, True]])
    z = Zero()(h, sel(2, 3, mask))
    assert torch.equal(z[mask], torch.zeros(2, 8)) and torch.equal(z[~mask], h[~mask])
    stored = torch.randn(2, 5, 8)
    r = Replace(stored)(h, sel(2, 3, past=2))  # positions 2..4
    assert torch.equal(r, stored[:, 2:5])
    r = Replace(stored[0])(h, sel(2, 3, past=4))  # positions 4..6: only 4 exists in the store
    assert torch.equal(r[:, 0], stored[0, 4].expand(2, 8)) and torch.equal(r[:, 1:], h[:, 1:])
    assert h.shape == (2, 3, 8)  # inputs untouched
    for bad in (lambda: AddVector(torch.ones(2, 2)), lambda: ProjectOut(torch.zeros(4)), lambda: Clamp(),
                lambda: Clamp(2, 1), lambda: Replace(torch.ones(1, 1, 1, 1)), lambda: Target(positions="later"),
                lambda: Target(rows=[-1]), lambda: Target(steps="3")):
        with pytest.raises(ValueError):
            bad()


class Recorder(Edit):
    """An edit that changes nothing and records which (step, row, position) it was applied to."""

    kind = "record"

    def __init__(self):
        self.seen = []

    def apply(self, h, sel):
        mask = sel.mask if sel.mask is not None else torch.ones(sel.b, sel.s, dtype=torch.bool)
        for r, i in mask.nonzero().tolist():
            self.seen.append((sel.call.step, r, int(sel.positions[r, i])))
        return h


CASES = [
    (dict(positions="prompt"), lambda st, r, p: st == -1),
    (dict(positions="generated"), lambda st, r, p: st >= 0),
    (dict(steps=[0, 3]), lambda st, r, p: st in (0, 3)),
    (dict(rows=[1], positions="generated", steps=[2]), lambda st, r, p: r == 1 and st == 2),
    (dict(positions=[2, 13]), lambda st, r, p: p in (2, 13)),
    (dict(rows=[0, 2], positions="prompt"), lambda st, r, p: r != 1 and st == -1),
]


def test_targets_select_exactly(tiny):
    model = tiny
    ids = prompts(model, 3, 8)
    rec_all = Recorder()
    recs = [Recorder() for _ in CASES]
    handles = [add_edit(model, "blocks.0.resid_pre", rec_all)]
    handles += [add_edit(model, "blocks.1.attn.attn_output", rec, **kw) for rec, (kw, _) in zip(recs, CASES)]
    try:
        generate(model, ids, 6)
    finally:
        for h in handles:
            h.remove()
    # every position once: prompt positions 0..6 (prefill of prompt[:-1]), then steps 0..5 at positions 7..12
    assert sorted(rec_all.seen) == sorted([(-1, r, p) for r in range(3) for p in range(7)] +
                                          [(k, r, 7 + k) for r in range(3) for k in range(6)])
    for rec, (kw, expect) in zip(recs, CASES):
        assert sorted(rec.seen) == sorted(x for x in rec_all.seen if expect(*x)), kw


def test_cached_steering_equals_uncached(tiny):
    """An edit on all positions, and one on a single explicit position, give the same logits whether the sequence
    is decoded one token at a time with the cache or processed in one pass."""
    model = tiny
    ids = prompts(model, 2, 7, seed=1)
    v = torch.randn(model.config.hidden_size) * 0.5
    for target in (Target(), Target(positions=[4]), Target(positions=[9])):
        with add_edit(model, "blocks.1.resid_mid", AddVector(v), target):
            toks, step_logits = generate(model, ids, 5)
            full = model.forward(torch.cat([ids, toks[:, :-1]], 1))
        torch.testing.assert_close(step_logits, full[:, ids.shape[1] - 1:], atol=1e-4, rtol=0)
    base_toks, base_logits = generate(model, ids, 5)
    with add_edit(model, "blocks.1.resid_mid", AddVector(v), positions=[9]):
        _, late = generate(model, ids, 5)
    assert torch.equal(late[:, :3], base_logits[:, :3]), "position 9 is step 3: earlier steps must not change"
    assert (late[:, 3] - base_logits[:, 3]).abs().max() > 1e-4


def test_rows_and_steps_restrict_the_effect(tiny):
    model = tiny
    ids = prompts(model, 3, 6, seed=2)
    v = torch.randn(model.config.hidden_size)
    _, base = generate(model, ids, 6)
    with add_edit(model, "blocks.2.resid_pre", AddVector(v), rows=[1], steps=[2]):
        _, ed = generate(model, ids, 6)
    diff = (ed - base).abs().amax(-1)
    assert torch.equal(diff[[0, 2]], torch.zeros(2, 6))
    assert torch.equal(diff[1, :2], torch.zeros(2)) and diff[1, 2] > 1e-3
    # rows chosen at run time (a batching generator's per-job restriction), list or callable
    h = add_edit(model, "blocks.2.resid_pre", AddVector(v))
    try:
        h.rows = [2]
        _, ed2 = generate(model, ids, 3)
        h.rows = lambda: [0]
        _, ed0 = generate(model, ids, 3)
    finally:
        h.remove()
    d2, d0 = (ed2 - base[:, :3]).abs().amax(-1), (ed0 - base[:, :3]).abs().amax(-1)
    assert torch.equal(d2[:2], torch.zeros(2, 3)) and (d2[2] > 1e-4).all()
    assert torch.equal(d0[1:], torch.zeros(2, 3)) and (d0[0] > 1e-4).all()


def test_project_out_seen_by_later_capture(tiny):
    model = tiny
    ids = prompts(model, 2, 6, seed=3)
    d = torch.randn(model.config.hidden_size)
    u = d / d.norm()
    for name in ("blocks.1.resid_pre", "blocks.1.resid_post", "blocks.1.resid_mid"):
        with add_edit(model, name, ProjectOut(d)), add_capture(model, name) as cap:
            model.forward(ids)
        assert (cap[name].values @ u).abs().max() < 1e-4, name


def test_patching_all_positions_reproduces_clean_run(tiny):
    """Replace layer 0's residual everywhere with the clean run's (captured densely during cached generation):
    the corrupted run then generates exactly the clean run."""
    model = tiny
    clean = prompts(model, 2, 8, seed=4)
    corrupt = clean.clone()
    corrupt[:, 2] = (corrupt[:, 2] + 5) % model.config.vocab_size
    with add_capture(model, "blocks.0.resid_post") as cap:
        clean_toks, clean_logits = generate(model, clean, 6)
    _, corrupt_logits = generate(model, corrupt, 6)
    assert (corrupt_logits - clean_logits).abs().max() > 1e-3
    stored = cap["blocks.0.resid_post"].dense()
    assert stored.shape == (2, 8 + 6 - 1, model.config.hidden_size)
    with add_edit(model, "blocks.0.resid_post", Replace(stored)):
        toks, patched = generate(model, corrupt, 6)
    assert torch.equal(toks, clean_toks)
    torch.testing.assert_close(patched, clean_logits, atol=1e-5, rtol=0)
