"""Option layouts and their stored size, the batched EXL2 GPTQ against the packer and reference dequantiser,
and the bit-budget optimizer."""

from __future__ import annotations

import pytest
import torch

from exllamav2.conversion.adaptive_gptq import output_errors, prepare_hessian, quantize_options
from exllamav2.conversion.optimize import Slot, optimize
from exllamav2.conversion.qparams import CANDIDATES, QuantOption
from exllamav2.quant import exl2_dequantize, exl2_pack
from exllamav2.quant.exl2 import exl2_bits_per_weight, read_exl2


def test_group_layout():
    o = QuantOption((5, 4), (0.25, 0.75), 64)
    groups = o.groups(300)
    assert sum(r for _, r in groups) == 300
    assert [b for b, _ in groups] == [5, 5] + [4] * 3  # ceil(75 / 64) = 2 groups of 5-bit rows
    assert all(r == 64 for _, r in groups[:-1]) and groups[-1] == (4, 300 - 4 * 64)
    with pytest.raises(ValueError, match="descending"):
        QuantOption((4, 5), (0.5, 0.5), 64)


def test_quantized_options_pack_exactly():
    torch.manual_seed(0)
    out, n_in = 72, 192
    W = torch.randn(out, n_in)
    X = torch.randn(1024, n_in) * torch.linspace(0.2, 2.0, n_in)
    prep = prepare_hessian(X.T @ X)
    opts = [CANDIDATES[0], CANDIDATES[5], CANDIDATES[10], CANDIDATES[-1]]
    res = quantize_options(W, prep, opts)
    errs = output_errors(W, prep, [r.dequant for r in res])
    # GPTQ's bookkeeping gives the same error as the direct trace through H
    assert all(abs(r.error - e) < 1e-4 * max(e, 1e-2) + 1e-6 for r, e in zip(res, errs)), ([r.error for r in res], errs)
    assert errs == sorted(errs, reverse=True) and errs[-1] < 0.01 < errs[0] < 0.5
    for r in res:
        t = exl2_pack(r.codes, r.groups, r.scale_codes, r.scale_max, r.perm)
        e = read_exl2(t, "", n_in, out)
        assert torch.equal(exl2_dequantize(e, "", torch.float16).float(), r.dequant)
        assert exl2_bits_per_weight(e) == r.option.bpw(n_in, out)
        # act-order: the widest rows are the features with the largest Hessian diagonal
        assert r.perm[0] == torch.argmax(torch.diag(X.T @ X))
    # output error computed from H equals the error on the activations themselves
    y, yq = X @ W.T, X @ res[1].dequant.T
    assert abs(float((y - yq).norm() / y.norm()) - errs[1]) < 1e-4


def test_optimizer_hits_budget_and_prefers_sensitive_slots():
    bits = tuple(b * 1000 for b in (2, 3, 4, 5, 6, 8))
    flat = tuple(0.1 * 2.0 ** -b for b in (2, 3, 4, 5, 6, 8))
    slots = [Slot(f"s{i}", 1000, bits, tuple(e * (10 if i == 0 else 1) for e in flat)) for i in range(8)]
    choice = optimize(slots, 4.0)
    total = sum(s.bits[j] for s, j in zip(slots, choice))
    assert 3.95 * 8000 <= total <= 4.0 * 8000
    assert choice[0] == max(choice), "the slot with 10x the error gets the most bits"
    assert optimize(slots, 9.0) == [5] * 8
    with pytest.raises(ValueError, match="below the smallest achievable"):
        optimize(slots, 1.5)


def test_optimizer_keeps_every_slot_near_the_target():
    bits = tuple(b * 1000 for b in (2, 3, 4, 5, 6, 8))
    flat = tuple(0.1 * 2.0 ** -b for b in (2, 3, 4, 5, 6, 8))
    # slot 0's errors look negligible at every width: unbounded, it would drop to 2 bits to pay for the others
    slots = [Slot("s0", 1000, bits, tuple(e * 1e-4 for e in flat))] + [Slot(f"s{i}", 1000, bits, flat) for i in range(1, 8)]
    free = optimize(slots, 6.0, max_drop=10)
    assert free[0] == 0
    bounded = optimize(slots, 6.0)
    assert all(slots[i].bits[j] / slots[i].numel >= 6.0 - 2.0 for i, j in enumerate(bounded))
    assert sum(s.bits[j] for s, j in zip(slots, bounded)) <= 6.0 * 8000


def test_trust_bound_by_target_and_rotation():
    from exllamav2.conversion.optimize import MAX_DROP_BPW, ROTATED_LOW_TARGET_MAX_DROP_BPW, max_drop_for
    assert max_drop_for(4.6, rotated=True) == ROTATED_LOW_TARGET_MAX_DROP_BPW < MAX_DROP_BPW
    assert max_drop_for(4.6, rotated=False) == MAX_DROP_BPW
    assert max_drop_for(6.0, rotated=True) == MAX_DROP_BPW


def test_max_drop_setting_checked(tmp_path):
    from exllamav2.conversion import ConvertSettings
    from exllamav2.conversion.converter import Converter
    from test_convert_common import make_tiny_llama
    src = make_tiny_llama(tmp_path / "m")
    with pytest.raises(ValueError, match="max_drop"):
        Converter(ConvertSettings(in_dir=src, out_dir=str(tmp_path / "o"), max_drop=0.0), progress=False)
    # the default (None) leaves the job settings as before, so older job folders stay resumable
    assert "max_drop" not in ConvertSettings(in_dir=src, out_dir="o").job_settings()
    assert ConvertSettings(in_dir=src, out_dir="o", max_drop=0.5).job_settings()["max_drop"] == 0.5
