"""A fixed subset of bench/fuzz_gguf.py (the randomized GGUF fuzz) that needs no llama.cpp: tiny random models of
each GGUF family we read (llama, qwen2, qwen3, gemma3, mixtral, qwen2moe, qwen3moe; hidden 256/512, head_dim
64/128/256, GQA, odd vocabularies, tied and untied heads), written as GGUF with the `gguf` library's quantizers
(Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/TQ2_0) or random valid K-quant/IQ4 blocks, then:
  - our fp32 logits (prefill + 12 cached decode steps) within 1e-4 of the span of HF transformers' on the file's
    weights as gguf-py dequantises them (mapped back by the fuzz script's own name table, not our loader's);
  - every call of the C++ GGUF kernel in bf16 and fp16 against x @ W.T in fp32 (bf16 1.5e-2, fp16 3e-3 relative
    in norm), and the whole model on the default backend no further from the fp32 oracle than twice the torch
    backend's (dequantised) error plus the int8-activation allowance;
  - three left-padded prompts in one batch against each alone (fp32 logits 1e-4, greedy tokens);
  - the dynamic generator's greedy tokens against model.forward + argmax (fp32 and bf16).
The llama-quantize cases (every K-quant mix) are marked slow and skip only where the binary is absent."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import fuzz_gguf as fz  # noqa: E402

from exllamav2.gguf import GGUFError, GGUFFile  # noqa: E402

FAST_CASES = [
    # seeds picked so the K-quant cases get widths of 256k (their blocks apply to every matrix) and gemma3 Q4_K
    # gets 7 layers (5 sliding, 1 full, 1 sliding)
    ("llama", "Q4_0", 11), ("qwen2", "Q5_1", 12), ("qwen3", "Q8_0", 13), ("gemma3", "Q4_K", 14),
    ("mixtral", "Q6_K", 115), ("qwen2moe", "Q5_0", 16), ("qwen3moe", "IQ4_XS", 117), ("llama", "Q2_K", 118),
    ("qwen2", "Q3_K", 19), ("llama", "IQ4_NL", 20), ("qwen3", "Q5_K", 21), ("gemma3", "Q4_1", 22),
]


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _run_case(arch, qtype, seed, tmp_path, quantizer, dtypes=("bfloat16", "float16")):
    case = fz.Case(seed, arch, qtype, str(tmp_path / f"{arch}-{qtype}"), hf_loader=False, dtypes=dtypes,
                   quantizer=quantizer)
    assert case.build() is not None
    case.run()
    assert not case.problems, "\n".join([f"{arch} {case.desc} {case.shape}: {case.types}", *case.problems])
    return case


@pytest.mark.parametrize("arch,qtype,seed", FAST_CASES, ids=[f"{a}-{q}" for a, q, _ in FAST_CASES])
def test_fuzz_case_gguf_py(arch, qtype, seed, tmp_path):
    case = _run_case(arch, qtype, seed, tmp_path, "gguf-py", dtypes=("bfloat16", "float16") if seed % 2 else ("float16",))
    # the file holds the type asked for, and the C++ kernel really ran on it (the audit saw its calls)
    assert qtype in case.types
    from exllamav2.ops.cpu import kernels
    if kernels.ready(progress=False):
        assert case.audit_calls > 0


def test_kernel_audit_catches_a_wrong_kernel(tmp_path):
    """The audit is no rubber stamp: a kernel whose output is off by 3% in one row is reported."""
    from exllamav2.ops.cpu import gemv_linear, kernels
    if not kernels.ready(progress=False):
        pytest.skip("no C++ kernels here")
    case = fz.Case(5, "llama", "Q4_0", str(tmp_path / "c"), quantizer="gguf-py", checks=("kernels",),
                   dtypes=("float16",))
    case.build()
    real = gemv_linear.GgufGemvKernel.__call__

    def skewed(self, x):
        y = real(self, x)
        y[..., 0] *= 1.5
        return y

    gemv_linear.GgufGemvKernel.__call__ = skewed
    try:
        case.run()
    finally:
        gemv_linear.GgufGemvKernel.__call__ = real
    assert any(p.startswith("kernel float16 Q4_0") for p in case.problems), case.problems


def _rewrite_gguf(src: str, dst: str, meta: dict | None = None, tensor=None) -> str:
    """A copy of the GGUF file `src` with metadata values replaced (`meta`: key -> value) and each tensor's data
    passed through `tensor(name, data)`."""
    import gguf
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, "llama")
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        vt = f.types[0]
        value = (meta or {}).get(k, f.contents())
        w.add_key_value(k, value, vt, sub_type=f.types[-1] if vt == gguf.GGUFValueType.ARRAY else None)
    for k, value in (meta or {}).items():  # keys the file lacks (integers)
        if k not in r.fields:
            w.add_uint32(k, value)
    for t in r.tensors:
        data = np.asarray(t.data)
        if tensor is not None:
            data = tensor(t.name, data)
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            w.add_tensor(t.name, data)
        else:
            w.add_tensor(t.name, data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_zero_width_tensor_names_file_and_tensor(tmp_path):
    """A quantized tensor with a zero dimension used to fail inside gguf-py ("cannot reshape array of size 0")
    with no file or tensor named."""
    hf = fz.random_model("llama", 3)
    path = fz.write_f16_gguf(hf, "llama", str(tmp_path / "zero.gguf"), qtype="Q8_0")
    bad = _rewrite_gguf(path, str(tmp_path / "bad.gguf"),
                        tensor=lambda name, data: data[:, :0] if name == "blk.0.attn_output.weight" else data)
    src = GGUFFile(bad)
    with pytest.raises(GGUFError, match=r"bad\.gguf: tensor 'blk\.0\.attn_output\.weight'"):
        src.get_tensor("model.layers.0.self_attn.o_proj.weight")


def test_head_count_not_matching_q_rows_names_file_and_tensor(tmp_path):
    """A "llama" file whose head_count does not split attn_q's rows into rotary pairs: the un-permutation raised a
    bare ValueError ("64 rows do not split into 5 heads of rotary pairs") naming neither the file nor the tensor."""
    from test_gguf_support import write_tiny_gguf
    path = write_tiny_gguf(str(tmp_path / "heads.gguf"), heads=4, kv_heads=2, head_dim=16, hidden=64)
    # attn_q holds 4 * 16 = 64 rows; make the metadata say 5 heads, which 64 rows do not split into
    bad = _rewrite_gguf(path, str(tmp_path / "bad.gguf"), meta={"llama.attention.head_count": 5})
    src = GGUFFile(bad)
    with pytest.raises(GGUFError, match=r"bad\.gguf: tensor 'blk\.0\.attn_q\.weight'.*num_attention_heads 5"):
        src.get_tensor("model.layers.0.self_attn.q_proj.weight")


def test_metadata_disagreeing_with_a_tensor_names_file_and_tensor(tmp_path):
    """feed_forward_length says one width, ffn_gate holds another: the shape error names the file and the GGUF
    tensor, not only the HF key."""
    from exllamav2 import ExLlamaV2, ExLlamaV2Config
    from exllamav2.module import TensorShapeError
    from test_gguf_support import write_tiny_gguf
    path = write_tiny_gguf(str(tmp_path / "ffn.gguf"), heads=4, kv_heads=2, head_dim=16, hidden=64)
    width = int(GGUFFile(path).shape("model.layers.0.mlp.gate_proj.weight")[0])
    bad = _rewrite_gguf(path, str(tmp_path / "bad.gguf"), meta={"llama.feed_forward_length": width + 32})
    with pytest.raises(TensorShapeError, match=r"bad\.gguf \(tensor 'blk\.0\.ffn_(gate|up)\.weight'\): "
                                               r"model\.layers\.0\.mlp\.(gate|up)_proj\.weight: shape"):
        ExLlamaV2(ExLlamaV2Config(bad)).load()


def test_partial_rotary_llama_file_is_refused(tmp_path):
    """llama.cpp refuses a "llama" file whose rope.dimension_count is not the head width ("invalid n_rot"); loading
    it as full rotary would be a silent wrong answer."""
    from exllamav2 import ExLlamaV2Config
    from test_gguf_support import write_tiny_gguf
    path = write_tiny_gguf(str(tmp_path / "rot.gguf"), heads=4, kv_heads=2, head_dim=16, hidden=64)
    bad = _rewrite_gguf(path, str(tmp_path / "bad.gguf"), meta={"llama.rope.dimension_count": 8,
                                                                          "llama.attention.key_length": 16})
    with pytest.raises(GGUFError, match=r"bad\.gguf: llama\.rope\.dimension_count 8"):
        ExLlamaV2Config(bad)


# ------------------------------------------------------------------------------------------------ llama.cpp

SLOW_CASES = [
    ("llama", "Q4_K_M", 31), ("qwen2", "Q3_K_S", 32), ("qwen3", "Q5_K_M", 33), ("gemma3", "Q6_K", 34),
    ("mixtral", "Q4_K_S", 35), ("qwen2moe", "Q2_K", 36), ("qwen3moe", "IQ4_XS", 37), ("llama", "Q3_K_M", 38),
    ("qwen3", "IQ4_NL", 39), ("llama", "MIX", 40), ("qwen2", "MIX", 41), ("gemma3", "MIX", 42),
    ("llama", "TQ1_0", 43), ("qwen3moe", "MXFP4_MOE", 44),
]


@pytest.mark.slow
@pytest.mark.parametrize("arch,qtype,seed", SLOW_CASES, ids=[f"{a}-{q}" for a, q, _ in SLOW_CASES])
def test_fuzz_case_llama_quantize(arch, qtype, seed, tmp_path):
    if not fz.llama_quantize_available():
        pytest.skip(f"llama-quantize not found at {fz.LLAMA_QUANTIZE}")
    _run_case(arch, qtype, seed, tmp_path, "llama")
