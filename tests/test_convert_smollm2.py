"""SmolLM2-135M converted by our quantizer (slow: about half an hour on 2 shared cores; run with
`pytest -m slow tests/test_convert_smollm2.py`). Perplexity on held-out text vs the unquantized model:
8.0 bpw (--rotate) within 0.3%, 6.0 within 1.5%, 4.0 within 8% and no worse than GPTQ 4-bit g128; bpw within 0.05."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from exllamav2 import ExLlamaV2Config
from exllamav2.conversion import ConvertSettings, convert_exl2
from exllamav2.conversion.adaptive_gptq import damp_for_target
from exllamav2.gguf import convert_gguf_to_hf
from exllamav2.tokenizer import ExLlamaV2Tokenizer

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
from quant_quality import perplexity  # noqa: E402

HELD_OUT = "/usr/share/common-licenses/GPL-3"


@pytest.mark.slow
def test_smollm2_quality(smollm2_gguf, tmp_path):
    if not os.path.isfile(HELD_OUT):
        pytest.skip(f"{HELD_OUT} (held-out text) not on this machine")
    hf_dir = convert_gguf_to_hf(smollm2_gguf, tmp_path / "hf", dtype=torch.bfloat16, progress=False)
    with open(HELD_OUT, encoding="utf-8") as f:
        ids = ExLlamaV2Tokenizer(ExLlamaV2Config(hf_dir)).encode(f.read())[:, :4096]
    # fp32 activations, as bench/quant_quality.py: bf16 arithmetic alone moves these figures by tenths of a percent
    base = perplexity(hf_dir, ids, 512, torch.float32)
    ppl = {}
    # 8.0 with the residual stream rotated: unrotated, requantizing the Q4_1 source's grid costs +0.16-0.69%
    # (bench/README_QUANT.md, session 5); rotated, its 8-bit error is plain noise
    for name, bits, hb, gptq, rotate in (("4.0", 4.0, 6, False, False), ("gptq", 4.0, 6, True, False),
                                         ("6.0", 6.0, 8, False, False), ("8.0", 8.0, 8, False, True)):
        # damping follows the target; a rotated model is measured on its own
        measurement = str(tmp_path / f"measurement{'_rot' if rotate else ''}_damp{damp_for_target(bits)}.json")
        s = ConvertSettings(hf_dir, str(tmp_path / name), bits=bits, head_bits=hb, gptq=gptq, rotate=rotate,
                            measurement=measurement if os.path.isfile(measurement) and not gptq else None,
                            save_measurement=None if gptq else measurement)
        summary = convert_exl2(s, progress=False)
        if not gptq:
            assert abs(summary["bpw"] - bits) <= 0.05, (name, summary["bpw"])
        ppl[name] = perplexity(s.out_dir, ids, 512, torch.float32)
    assert ppl["8.0"] <= base * 1.003, (ppl, base)
    assert ppl["6.0"] <= base * 1.015, (ppl, base)
    assert ppl["4.0"] <= base * 1.08, (ppl, base)
    assert ppl["4.0"] <= ppl["gptq"], ppl
