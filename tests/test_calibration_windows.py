"""Calibration rows: windows spread over a long text, wrap-around for a short one; the converter's held-out
Hessian split covers every row once."""

from __future__ import annotations

import torch

from exllamav2.attn import ExLlamaV2Attention
from exllamav2.conversion.calibration import calibration_ids
from exllamav2.conversion.layers import run_module
from test_convert_common import load_ours, make_tiny_llama


class _StreamTokenizer:
    """Token i of the text is i (so a window's ids are its offsets)."""

    def __init__(self, n: int):
        self.n = n

    def encode(self, text, add_bos=False):
        return torch.arange(self.n).unsqueeze(0)


def test_windows_cover_a_long_text_evenly():
    ids = calibration_ids(_StreamTokenizer(10_000), "", rows=5, length=100)
    assert ids.shape == (5, 100)
    starts = ids[:, 0].tolist()
    assert starts[0] == 0 and ids[-1, -1] == 9_999  # first window at the start, last one ends at the end
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert max(gaps) - min(gaps) <= 1 and min(gaps) > 100  # evenly spaced, no overlap
    assert all(torch.equal(r, torch.arange(r[0], r[0] + 100)) for r in ids)  # each row is contiguous text


def test_short_text_wraps_around():
    ids = calibration_ids(_StreamTokenizer(250), "", rows=4, length=100)
    assert ids.reshape(-1).tolist() == [i % 250 for i in range(400)]


def test_held_out_split_sums_to_the_full_hessian(tmp_path):
    model = load_ours(make_tiny_llama(tmp_path / "m"))
    attn = next(m for m in model.modules if isinstance(m, ExLlamaV2Attention))
    torch.manual_seed(0)
    states = torch.randn(5, 16, model.config.hidden_size)
    _, H = run_module(attn, states, batch_rows=2, capture="post_norm", keep_output=False)
    _, (Hf, Hv) = run_module(attn, states, batch_rows=2, capture="post_norm", keep_output=False, split=True)
    torch.testing.assert_close(Hf + Hv, H, rtol=1e-5, atol=1e-4)
    _, Heven = run_module(attn, states[0::2], batch_rows=3, capture="post_norm", keep_output=False)
    torch.testing.assert_close(Hf, Heven, rtol=1e-5, atol=1e-4)  # rows 0, 2, 4 fit; 1, 3 are held out
    assert not torch.allclose(Hf, Hv)
