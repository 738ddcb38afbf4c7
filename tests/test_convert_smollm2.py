"""SmolLM2-135M: our EXL2 against llama.cpp's quantizations of the same source at equal bits (issue #22), through
bench/quant_peers.py. Slow (about 1.5 hours on 2 shared cores; `pytest -m slow tests/test_convert_smollm2.py`) and
needs llama.cpp's llama-quantize (bench/setup_llamacpp.sh). QUANT_PEERS_WORK=DIR reuses a bench run's folder
(its cached rows are rescored only if their settings changed).

For every preset Q3_K_M .. Q8_0: the EXL2 conversion at that file's measured bpw (decoder linears, ±0.05) has lower
fp32 perplexity than it on both held-out texts (prose and code, 8192 tokens each)."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import quant_peers  # noqa: E402


@pytest.mark.slow
def test_exl2_beats_llama_cpp_at_equal_bits(smollm2_gguf, tmp_path):
    why = quant_peers.llama_quantize_missing(quant_peers.DEFAULT_LLAMA_QUANTIZE)
    if why is not None:
        pytest.skip(why)
    work = os.environ.get("QUANT_PEERS_WORK", str(tmp_path))
    assert quant_peers.main(["--work", work]) == 0
    with open(os.path.join(work, "results.json")) as f:
        rows = json.load(f)["rows"]
    losses = []
    for point in quant_peers.POINTS:
        theirs = rows[f"llama.cpp {point}"]
        ours = [r for label, r in rows.items() if label.startswith("EXL2") and abs(r["bpw"] - theirs["bpw"]) <= 0.05]
        assert ours, f"no EXL2 row within 0.05 bpw of {point} ({theirs['bpw']:.3f})"
        closest = min(ours, key=lambda r: abs(r["bpw"] - theirs["bpw"]))
        for kind in ("prose", "code"):
            if closest["ppl"][kind] >= theirs["ppl"][kind]:
                losses.append(f"{point} {kind}: {closest['ppl'][kind]:.3f} vs {theirs['ppl'][kind]:.3f}")
    assert not losses, "EXL2 loses to llama.cpp at equal bits: " + "; ".join(losses)
