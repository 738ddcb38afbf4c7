"""An interrupted conversion resumes from its working folder and ends bit for bit where an uninterrupted run does
(tied-embedding model, so the separate lm_head path is covered too)."""

from __future__ import annotations

import json
import os

import pytest
from safetensors.torch import load_file

from exllamav2.conversion import ConvertSettings, convert_exl2
from test_convert_common import LENGTH, ROWS, make_tiny_llama


class Stop(Exception):
    pass


def stop_at(stage: str, index: int):
    def on_step(s, i):
        if (s, i) == (stage, index):
            raise Stop(f"{s} {i}")
    return on_step


def test_resume_equals_uninterrupted(tmp_path):
    src = make_tiny_llama(tmp_path / "fp32", tied=True)
    settings = lambda out, work: ConvertSettings(src, str(tmp_path / out), bits=4.0, head_bits=6, rows=ROWS,
                                                 length=LENGTH, work_dir=str(tmp_path / work))
    ref = convert_exl2(settings("ref", "work_ref"), progress=False)

    s = settings("res", "work_res")
    with pytest.raises(Stop):
        convert_exl2(s, progress=False, on_step=stop_at("measure", 1))
    with open(tmp_path / "work_res" / "job.json") as f:
        job = json.load(f)
    assert job["stage"] == "measure" and job["measure_done"] == 2
    with pytest.raises(Stop):
        convert_exl2(s, progress=False, on_step=stop_at("quant", 2))
    with open(tmp_path / "work_res" / "job.json") as f:
        assert json.load(f)["quant_done"] == 3
    seen = []
    res = convert_exl2(s, progress=False, on_step=lambda st, i: seen.append((st, i)))
    assert seen == [("quant", 3), ("quant", 4)], "the resumed run must redo nothing"
    assert not os.path.exists(tmp_path / "work_res"), "the job folder is removed after success"

    assert res["strategy"] == ref["strategy"] and res["bpw"] == ref["bpw"]
    a = load_file(str(tmp_path / "ref" / "output.safetensors"))
    b = load_file(str(tmp_path / "res" / "output.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].equal(b[k]), k
    assert "lm_head.q_weight" in a and "model.embed_tokens.weight" in a
    with open(tmp_path / "res" / "config.json") as f:
        assert json.load(f)["tie_word_embeddings"] is False


def test_resume_refuses_other_settings(tmp_path):
    src = make_tiny_llama(tmp_path / "fp32")
    work = str(tmp_path / "work")
    s = ConvertSettings(src, str(tmp_path / "out"), bits=4.0, rows=ROWS, length=LENGTH, work_dir=work)
    with pytest.raises(Stop):
        convert_exl2(s, progress=False, on_step=stop_at("measure", 0))
    other = ConvertSettings(src, str(tmp_path / "out"), bits=5.0, rows=ROWS, length=LENGTH, work_dir=work)
    with pytest.raises(ValueError, match="different settings.*bits"):
        convert_exl2(other, progress=False)
