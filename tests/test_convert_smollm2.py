"""SmolLM2-135M: our EXL2 against llama.cpp's quantizations of the same source at equal bits (issue #22), through
bench/quant_peers.py. Slow (hours on 2 shared cores; `pytest -m slow tests/test_convert_smollm2.py`) and needs
llama.cpp's llama-quantize (bench/setup_llamacpp.sh). QUANT_PEERS_WORK=DIR reuses a bench run's folder (its cached
rows are rescored only if their settings changed); QUANT_PEERS_ROTATE=1 adds the --rotate conversions.

One test per preset Q3_K_M .. Q8_0, so each passes or fails on its own: an EXL2 conversion at that file's measured
bpw (decoder linears, ±0.05; any variant the run made, plain or rotated) has lower fp32 perplexity than it on both
held-out texts (prose and code, 8192 tokens each)."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import quant_peers  # noqa: E402


@pytest.fixture(scope="module")
def peer_rows(smollm2_gguf, tmp_path_factory):
    why = quant_peers.llama_quantize_missing(quant_peers.DEFAULT_LLAMA_QUANTIZE)
    if why is not None:
        pytest.skip(why)
    work = os.environ.get("QUANT_PEERS_WORK", str(tmp_path_factory.mktemp("quant_peers")))
    assert quant_peers.main(["--work", work]) == 0
    if os.environ.get("QUANT_PEERS_ROTATE"):
        assert quant_peers.main(["--work", work, "--rotate"]) == 0
    with open(os.path.join(work, "results.json")) as f:
        return json.load(f)["rows"]


@pytest.mark.slow
@pytest.mark.parametrize("point", quant_peers.POINTS)
def test_exl2_beats_llama_cpp_at_equal_bits(peer_rows, point):
    theirs = peer_rows[f"llama.cpp {point}"]
    ours = {label: r for label, r in peer_rows.items()
            if label.startswith("EXL2") and abs(r["bpw"] - theirs["bpw"]) <= 0.05}
    assert ours, f"no EXL2 row within 0.05 bpw of {point} ({theirs['bpw']:.3f})"
    gaps = {label: {k: r["ppl"][k] / theirs["ppl"][k] - 1 for k in ("prose", "code")} for label, r in ours.items()}
    winners = [label for label, g in gaps.items() if all(v < 0 for v in g.values())]
    assert winners, f"EXL2 loses to llama.cpp {point} at {theirs['bpw']:.3f} bpw: " + "; ".join(
        f"{label}: " + ", ".join(f"{k} {100 * v:+.2f}%" for k, v in g.items()) for label, g in gaps.items())
