"""bench/quant_peers.py and the F16 GGUF writer it uses (exllamav2/conversion/gguf_export.py), on a tiny random
Llama: the GGUF reads back in this engine with the HF model's logits, the bench's llama.cpp rows are skipped with a
clear message when llama-quantize is absent (and made when it is present), and its EXL2 rows are real conversions."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

from exllamav2.conversion.gguf_export import gguf_decoder_bpw, permute_rotary_rows, write_f16_gguf
from exllamav2.gguf.layout import unpermute_rotary_rows
from test_convert_common import held_out_ids, hf_logits, load_ours, make_tiny_llama, rel_error

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import quant_peers  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("peers")
    (base / "m").mkdir()
    # one layer keeps the bench's EXL2 conversion (every candidate option of every linear) short
    return make_tiny_llama(base / "m", tied=True, layers=1)


def test_permutation_inverts_the_readers():
    rows = np.arange(4 * 16 * 3).reshape(64, 3)
    assert (unpermute_rotary_rows(permute_rotary_rows(rows, 4), 4) == rows).all()
    assert not (permute_rotary_rows(rows, 4) == rows).all()
    with pytest.raises(ValueError, match="rotary pairs"):
        permute_rotary_rows(np.zeros((10, 3)), 4)


def test_f16_gguf_reads_back(tiny, tmp_path):
    path = write_f16_gguf(tiny, str(tmp_path / "m.gguf"), progress=False)
    bpw, types = gguf_decoder_bpw(path)
    assert bpw == 16.0 and types == {"F16": 7}
    ids = held_out_ids(tiny)
    ref = hf_logits(tiny, ids)
    # F16 rounding of weights drawn at scale 0.05 only
    assert rel_error(load_ours(path), ids, ref) < 5e-3
    from exllamav2 import ExLlamaV2Config, ExLlamaV2Tokenizer
    text = "The committee reviewed the proposal."
    assert (ExLlamaV2Tokenizer(ExLlamaV2Config(path)).encode(text) ==
            ExLlamaV2Tokenizer(ExLlamaV2Config(tiny)).encode(text)).all()


def test_unsupported_family_named():
    from types import SimpleNamespace
    from exllamav2.conversion.gguf_export import _gguf_spec
    with pytest.raises(ValueError, match=r"/some/folder: no GGUF name table for architecture GPTJForCausalLM"):
        _gguf_spec(SimpleNamespace(architecture="GPTJForCausalLM"), "/some/folder")
    assert _gguf_spec(SimpleNamespace(architecture="LlamaForCausalLM"), "/x").name == "llama"


def _texts(tmp_path):
    prose = tmp_path / "prose.txt"
    prose.write_text("Light, refracted by the prism, spread into a spectrum of colours on the wall. " * 20)
    code = tmp_path / "code.py"
    code.write_text("def area(r):\n    return 3.14159 * r * r\n\nfor i in range(10):\n    print(area(i))\n" * 20)
    return str(prose), str(code)


def test_bench_without_llama_quantize(tiny, tmp_path, capsys):
    prose, code = _texts(tmp_path)
    missing = str(tmp_path / "no" / "llama-quantize")
    args = [tiny, "--work", str(tmp_path / "work"), "--llama-quantize", missing, "--bits", "4.0",
            "--prose", prose, "--code", code, "--tokens", "128", "--window", "64", "--rows", "6", "--length", "128",
            "--head-bits", "6"]
    assert quant_peers.main(args) == 0
    out = capsys.readouterr().out
    assert f"llama.cpp rows skipped: llama-quantize not found at {missing}" in out
    assert "bench/setup_llamacpp.sh" in out
    with open(tmp_path / "work" / "results.json") as f:
        rows = json.load(f)["rows"]
    assert set(rows) == {"source", "EXL2 4.00"}
    e = rows["EXL2 4.00"]
    assert abs(e["bpw"] - 4.0) <= 0.05 and e["peak_rss_mib"] > 100 and e["seconds"] > 0 and e["measured"]
    for kind in ("prose", "code"):
        # a real conversion: close to the source, but not equal to it
        assert rows["source"]["ppl"][kind] != e["ppl"][kind]
        assert e["ppl"][kind] < rows["source"]["ppl"][kind] * 1.5
        assert f"ppl {kind}" in out
    assert "| EXL2 4.00 | " in out and "| source | 16.000 |" in out
    # the bench's scoring loop is quant_quality.perplexity's, with progress
    from exllamav2 import ExLlamaV2Config, ExLlamaV2Tokenizer
    from quant_quality import perplexity
    ids = quant_peers.text_ids(ExLlamaV2Tokenizer(ExLlamaV2Config(tiny)), code, 128, "code")
    assert rows["source"]["ppl"]["code"] == pytest.approx(perplexity(tiny, ids, 64, torch.float32), rel=1e-6)
    # a rerun prints the cached table without converting again
    assert quant_peers.main(args) == 0
    assert "converting" not in capsys.readouterr().out


def test_bench_bad_arguments(tiny, tmp_path):
    prose, code = _texts(tmp_path)
    with pytest.raises(SystemExit):
        quant_peers.main([tiny, "--points", "Q2_X", "--prose", prose, "--code", code])
    with pytest.raises(ValueError, match="fewer than --tokens 100000"):
        quant_peers.main([tiny, "--work", str(tmp_path / "w"), "--prose", prose, "--code", code,
                          "--tokens", "100000", "--no-exl2"])


@pytest.mark.skipif(quant_peers.llama_quantize_missing(quant_peers.DEFAULT_LLAMA_QUANTIZE) is not None,
                    reason="llama-quantize not built (bench/setup_llamacpp.sh)")
def test_bench_llama_cpp_rows(tiny, tmp_path, capsys):
    prose, code = _texts(tmp_path)
    args = [tiny, "--work", str(tmp_path / "work"), "--points", "Q8_0", "Q4_0", "--no-exl2", "--prose", prose,
            "--code", code, "--tokens", "128", "--window", "64"]
    assert quant_peers.main(args) == 0
    with open(tmp_path / "work" / "results.json") as f:
        rows = json.load(f)["rows"]
    # 256-wide rows: blocks of 32 with one fp16 scale (Q8_0 8.5 bpw, Q4_0 4.5 bpw)
    assert rows["llama.cpp Q8_0"]["bpw"] == pytest.approx(8.5)
    assert rows["llama.cpp Q4_0"]["bpw"] == pytest.approx(4.5)
    src = rows["source"]["ppl"]["prose"]
    assert abs(rows["llama.cpp Q8_0"]["ppl"]["prose"] / src - 1) < abs(rows["llama.cpp Q4_0"]["ppl"]["prose"] / src - 1)
    assert "no EXL2 row within" in capsys.readouterr().out


def test_held_out_texts_are_not_calibration_text():
    from exllamav2.conversion.calibration import read_calibration_text
    calibration, _ = read_calibration_text(None)
    cal = calibration.split()
    cal_grams = {tuple(cal[i:i + 12]) for i in range(len(cal) - 11)}
    for kind, path in (("prose", quant_peers.find_text(quant_peers.PROSE_CANDIDATES)),
                       ("code", quant_peers.find_text(quant_peers.CODE_CANDIDATES))):
        if path is None:
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            words = f.read().split()
        assert len(words) > 4000, (kind, path)
        # no run of 12 words of the held-out text appears in the calibration text
        shared = [i for i in range(len(words) - 11) if tuple(words[i:i + 12]) in cal_grams]
        assert not shared, (kind, path, " ".join(words[shared[0]:shared[0] + 12]))


def test_verdicts_pick_the_closest_row(tmp_path):
    results = quant_peers.Results(str(tmp_path / "r.json"), {"k": 1})
    results.put("source", {"bpw": 16.0, "ppl": {"prose": 10.0, "code": 5.0}})
    results.put("llama.cpp Q4_0", {"bpw": 4.5, "ppl": {"prose": 12.0, "code": 6.0}, "seconds": 1.0,
                                   "peak_rss_mib": 100.0})
    results.put("llama.cpp Q8_0", {"bpw": 8.5, "ppl": {"prose": 10.1, "code": 5.01}, "seconds": 1.0,
                                   "peak_rss_mib": 100.0})
    for label, bpw, prose, code in (("EXL2 4.46", 4.46, 11.0, 6.5), ("EXL2 4.50", 4.502, 11.5, 5.9)):
        results.put(label, {"bpw": bpw, "ppl": {"prose": prose, "code": code}, "seconds": 10.0, "measured": False,
                            "seconds_per_module": 0.5, "peak_rss_mib": 900.0})
    lines = quant_peers.verdicts(results, ["prose", "code"])
    assert "EXL2 4.50 vs llama.cpp Q4_0: WINS (prose -4.17%, code -1.67%" in lines[0]
    assert lines[1] == "llama.cpp Q8_0 (8.500 bpw): no EXL2 row within ±0.05"
    results.put("EXL2 4.50", {**results.rows["EXL2 4.50"], "ppl": {"prose": 11.5, "code": 6.1}})
    assert "LOSES (prose -4.17%, code +1.67%" in quant_peers.verdicts(results, ["prose", "code"])[0]
    table = quant_peers.table(results, ["prose", "code"]).splitlines()
    assert table[2].startswith("| source | 16.000 | 10.000 | 5.000 | - | - |")
    assert table[3].startswith("| EXL2 4.46 | 4.460 | 11.000 | 6.500 | +10.00% | +30.00% | 10 s | 0.5 s | 900 MiB |")
    # rows survive a reload with the same key, and are dropped when the settings changed
    assert set(quant_peers.Results(str(tmp_path / "r.json"), {"k": 1}).rows) == set(results.rows)
    assert quant_peers.Results(str(tmp_path / "r.json"), {"k": 2}).rows == {}


def test_verdicts_per_variant_and_rows_merged(tmp_path):
    key = {"k": 1}
    a = quant_peers.Results(str(tmp_path / "r.json"), key)
    b = quant_peers.Results(str(tmp_path / "r.json"), key)   # a second run on the same --work
    a.put("llama.cpp Q3_K_M", {"bpw": 4.634, "ppl": {"prose": 23.0, "code": 6.8}, "seconds": 1.0,
                               "peak_rss_mib": 100.0})
    b.put("EXL2 4.63", {"bpw": 4.63, "ppl": {"prose": 24.0, "code": 6.9}, "seconds": 1.0, "peak_rss_mib": 1.0})
    a.put("EXL2 4.63 rotated", {"bpw": 4.631, "ppl": {"prose": 22.0, "code": 6.7}, "seconds": 1.0,
                                "peak_rss_mib": 1.0})
    merged = quant_peers.Results(str(tmp_path / "r.json"), key)
    assert set(merged.rows) == {"llama.cpp Q3_K_M", "EXL2 4.63", "EXL2 4.63 rotated"}
    lines = quant_peers.verdicts(merged, ["prose", "code"])
    assert lines[0].startswith("EXL2 4.63 vs llama.cpp Q3_K_M: LOSES")
    assert lines[1].startswith("EXL2 4.63 rotated vs llama.cpp Q3_K_M: WINS")
    # a row lost from results.json (an older run rewrote it) comes back from its own file
    import json
    with open(tmp_path / "r.json", "w") as f:
        json.dump({"key": json.dumps(key, sort_keys=True), "rows": {}}, f)
    assert set(quant_peers.Results(str(tmp_path / "r.json"), key).rows) == set(merged.rows)
