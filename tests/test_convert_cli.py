"""The convert command: GPTQ mode end to end, and clear errors for bad input."""

from __future__ import annotations

import argparse
import json
import os

import pytest
import torch

from exllamav2.commands import convert as convert_cmd
from exllamav2.conversion import ConvertSettings, convert_exl2
from exllamav2.conversion.adaptive_gptq import DAMP_HIGH_TARGET, DAMP_LOW_TARGET
from exllamav2.conversion.converter import Converter
from test_convert_common import LENGTH, ROWS, held_out_ids, hf_logits, load_ours, make_tiny_llama, rel_error


def parse(argv):
    parser = argparse.ArgumentParser()
    convert_cmd.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["convert", *argv])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("cli") / "fp32")


def test_gptq_mode(tiny, tmp_path, capsys):
    out = str(tmp_path / "gptq")
    rc = convert_cmd.run(parse(["-i", tiny, "-o", out, "--gptq", "-r", str(ROWS), "-l", str(LENGTH)]))
    assert rc == 0 and "GPTQ 4-bit g128" in capsys.readouterr().out
    with open(f"{out}/config.json") as f:
        qc = json.load(f)["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["group_size"] == 128 and qc["desc_act"] is True
    model = load_ours(out)
    q = model.modules[2].down_proj.q_handle
    assert q.describe() == "GPTQ 4-bit g128 act-order"
    assert model.modules[-1].q_handle.describe().startswith("EXL2 6")
    ids = held_out_ids(tiny)
    assert rel_error(model, ids, hf_logits(tiny, ids)) < 0.7


def test_input_errors(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match="not an HF model folder"):
        convert_exl2(ConvertSettings(str(tmp_path), str(tmp_path / "o")), progress=False)
    with pytest.raises(ValueError, match="head bits must be one of"):
        convert_exl2(ConvertSettings(tiny, str(tmp_path / "o"), head_bits=7), progress=False)
    with pytest.raises(SystemExit):
        parse(["-i", tiny, "-o", "x", "-hb", "7"])


def test_damp_setting(tiny, tmp_path):
    args = parse(["-i", tiny, "-o", "x", "--damp", "0.03"])
    assert args.damp == 0.03
    base = ConvertSettings(tiny, "x")
    assert base.damp is None and base.job_settings()["damp"] is None
    for bits, want in ((4.0, DAMP_LOW_TARGET), (4.9, DAMP_LOW_TARGET), (5.0, DAMP_HIGH_TARGET), (8.0, DAMP_HIGH_TARGET)):
        assert Converter(ConvertSettings(tiny, str(tmp_path / f"a{bits}"), bits=bits), progress=False).damp == want
    assert Converter(ConvertSettings(tiny, str(tmp_path / "f"), bits=8.0, damp=0.03), progress=False).damp == 0.03
    # a working folder measured with other damping is not resumed
    assert ConvertSettings(tiny, "x", damp=0.03).job_settings() != base.job_settings()
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="damp"):
            convert_exl2(ConvertSettings(tiny, str(tmp_path / "o"), damp=bad), progress=False)


def test_damp_reaches_the_quantizer(tiny, tmp_path):
    """The same 8.0 bpw conversion at two damping values: different GPTQ results, both close to the original."""
    from safetensors.torch import load_file
    ids = held_out_ids(tiny)
    ref = hf_logits(tiny, ids)
    weights = {}
    for damp in (0.01, 10.0):
        out = str(tmp_path / f"d{damp}")
        convert_exl2(ConvertSettings(tiny, out, bits=8.0, head_bits=8, rows=ROWS, length=LENGTH, damp=damp),
                     progress=False)
        weights[damp] = {k: v for f in sorted(os.listdir(out)) if f.endswith(".safetensors")
                         for k, v in load_file(os.path.join(out, f)).items() if k.endswith("q_weight")}
        assert rel_error(load_ours(out), ids, ref) < 0.1
    assert weights[0.01].keys() == weights[10.0].keys()
    assert any(not torch.equal(weights[0.01][k], weights[10.0][k]) for k in weights[0.01])
