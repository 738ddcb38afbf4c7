"""MoE models as GGUF files (Mixtral as llama.cpp's "llama" with experts, "qwen2moe", "qwen3moe"): a tiny random HF
model written in llama.cpp's layout (3-D stacked expert tensors, q/k rows permuted for "llama") loads from the .gguf
and gives HF's logits (prefill and cached decode); quantized experts stay in the file's blocks, one GgufWeight per
expert over its rows of the 3-D tensor, and match HF on the dequantised weights and the dense load; bad files are
refused naming the file and tensor; convert-gguf writes per-expert tensors HF reads; under the Triton interpreter the MoE layers run the device-routed kernels."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import transformers as tf
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ops
from exllamav2.gguf import GGUFError, GGUFFile
from exllamav2.moe_mlp import ExLlamaV2MoEMLP
from exllamav2.quant.gguf import GgufWeight
from parity import ParityRunner, make_tiny

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, max_position_embeddings=128, num_experts_per_tok=2,
              tie_word_embeddings=False)

CASES = {
    "mixtral": (tf.MixtralForCausalLM, tf.MixtralConfig, dict(num_local_experts=4)),
    # a shared expert, unnormalised top-k and a dense block (a block without a router reads as mlp_only_layers)
    "qwen2_moe": (tf.Qwen2MoeForCausalLM, tf.Qwen2MoeConfig, dict(
        num_hidden_layers=3, num_experts=5, moe_intermediate_size=32, shared_expert_intermediate_size=96,
        mlp_only_layers=[2], norm_topk_prob=False)),
    "qwen3_moe": (tf.Qwen3MoeForCausalLM, tf.Qwen3MoeConfig, dict(
        num_experts=5, moe_intermediate_size=32, norm_topk_prob=True)),
}
GGUF_ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}
QUANT = {"mixtral": "Q8_0", "qwen2_moe": "Q4_0", "qwen3_moe": "Q5_0"}


def build(name):
    model_cls, cfg_cls, extra = CASES[name]
    return make_tiny(model_cls, cfg_cls(**{**COMMON, **extra}), seed=sum(map(ord, name)), init_scale=0.08)


# ------------------------------------------------------------------------------------------------ the writer

def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute: q/k rows in interleaved-rotary order."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _encode(values: np.ndarray, qtype: str):
    """(data, raw_dtype) for GGUFWriter.add_tensor."""
    t = GGMLQuantizationType[qtype]
    if qtype == "F32":
        return values.astype(np.float32), None
    if qtype == "F16":
        return values.astype(np.float16), None
    return quantize(values.astype(np.float32), t), t


def write_moe_gguf(hf, path: str, expert_qtype: str = "F32", *, omit: tuple = (), expert_count: int | None = None,
                   arch: str | None = None, raw_experts: dict | None = None, per_expert: bool = False) -> str:
    """`hf` as llama.cpp writes it: metadata, F32 tensors, stacked experts (E, rows, columns) as `expert_qtype`.
    `omit` leaves metadata fields out (names after '<arch>.'), `expert_count` overrides the stored count;
    `raw_experts` {GGUF name: uint8 blocks} writes those blocks as they are (K-quants, which the gguf library
    cannot quantize: see k_quant_experts); `per_expert` writes llama.cpp's layout from before the stacked tensors,
    one 2-D tensor per expert (blk.N.ffn_gate.E.weight)."""
    cfg = hf.config
    name = cfg.model_type
    arch = arch or GGUF_ARCH[name]
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    E = cfg.num_local_experts if name == "mixtral" else cfg.num_experts
    I = cfg.intermediate_size if name == "mixtral" else cfg.moe_intermediate_size
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads

    w = GGUFWriter(path, arch)
    meta = {
        "block_count": (w.add_block_count, cfg.num_hidden_layers),
        "context_length": (w.add_context_length, cfg.max_position_embeddings),
        "embedding_length": (w.add_embedding_length, cfg.hidden_size),
        "feed_forward_length": (w.add_feed_forward_length, cfg.intermediate_size),
        "attention.head_count": (w.add_head_count, heads),
        "attention.head_count_kv": (w.add_head_count_kv, kv_heads),
        "attention.layer_norm_rms_epsilon": (w.add_layer_norm_rms_eps, cfg.rms_norm_eps),
        "rope.freq_base": (w.add_rope_freq_base, cfg.rope_parameters["rope_theta"]),
        "vocab_size": (w.add_vocab_size, cfg.vocab_size),
        "expert_count": (w.add_expert_count, E if expert_count is None else expert_count),
        "expert_used_count": (w.add_expert_used_count, cfg.num_experts_per_tok),
    }
    if arch == "llama":
        meta["rope.dimension_count"] = (w.add_rope_dimension_count, cfg.head_dim)
    else:
        meta["attention.key_length"] = (w.add_key_length, cfg.head_dim)
        meta["attention.value_length"] = (w.add_value_length, cfg.head_dim)
        meta["expert_feed_forward_length"] = (w.add_expert_feed_forward_length, I)
    if name == "qwen2_moe":
        meta["expert_shared_feed_forward_length"] = (w.add_expert_shared_feed_forward_length,
                                                    cfg.shared_expert_intermediate_size)
    for key, (add, value) in meta.items():
        if key not in omit:
            add(value)

    def add(gguf_name, values, qtype="F32"):
        if raw_experts and gguf_name in raw_experts:
            data, raw_dtype = raw_experts[gguf_name], GGMLQuantizationType[qtype]
        else:
            data, raw_dtype = _encode(values, qtype)
        w.add_tensor(gguf_name, data, raw_dtype=raw_dtype)

    add("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        hf_b, b = f"model.layers.{i}.", f"blk.{i}."
        q, k = sd[hf_b + "self_attn.q_proj.weight"], sd[hf_b + "self_attn.k_proj.weight"]
        if arch == "llama":
            q, k = llama_cpp_permute(q, heads, heads), llama_cpp_permute(k, heads, kv_heads)
        add(b + "attn_norm.weight", sd[hf_b + "input_layernorm.weight"])
        add(b + "attn_q.weight", q)
        add(b + "attn_k.weight", k)
        add(b + "attn_v.weight", sd[hf_b + "self_attn.v_proj.weight"])
        add(b + "attn_output.weight", sd[hf_b + "self_attn.o_proj.weight"])
        for part in ("q", "k", "v"):
            if hf_b + f"self_attn.{part}_proj.bias" in sd:
                add(b + f"attn_{part}.bias", sd[hf_b + f"self_attn.{part}_proj.bias"])
        for part in ("q", "k"):
            if hf_b + f"self_attn.{part}_norm.weight" in sd:
                add(b + f"attn_{part}_norm.weight", sd[hf_b + f"self_attn.{part}_norm.weight"])
        add(b + "ffn_norm.weight", sd[hf_b + "post_attention_layernorm.weight"])
        if hf_b + "mlp.gate.weight" not in sd:  # a dense block
            for part in ("gate", "up", "down"):
                add(b + f"ffn_{part}.weight", sd[hf_b + f"mlp.{part}_proj.weight"])
            continue
        gate_up, down = sd[hf_b + "mlp.experts.gate_up_proj"], sd[hf_b + "mlp.experts.down_proj"]
        add(b + "ffn_gate_inp.weight", sd[hf_b + "mlp.gate.weight"])
        if per_expert:
            for e in range(E):
                add(b + f"ffn_gate.{e}.weight", gate_up[e, :I], expert_qtype)
                add(b + f"ffn_up.{e}.weight", gate_up[e, I:], expert_qtype)
                add(b + f"ffn_down.{e}.weight", down[e], expert_qtype)
        else:
            add(b + "ffn_gate_exps.weight", gate_up[:, :I], expert_qtype)
            add(b + "ffn_up_exps.weight", gate_up[:, I:], expert_qtype)
            add(b + "ffn_down_exps.weight", down, expert_qtype)
        if hf_b + "mlp.shared_expert_gate.weight" in sd:
            for part in ("gate", "up", "down"):
                add(b + f"ffn_{part}_shexp.weight", sd[hf_b + f"mlp.shared_expert.{part}_proj.weight"])
            add(b + "ffn_gate_inp_shexp.weight", sd[hf_b + "mlp.shared_expert_gate.weight"].reshape(-1))  # 1-D
    add("output_norm.weight", sd["model.norm.weight"])
    add("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def hf_on_dequantised_experts(hf, qtype: str):
    """A copy of `hf` whose expert weights are the `qtype` blocks' values (what the GGUF file holds)."""
    hf = copy.deepcopy(hf)
    t = GGMLQuantizationType[qtype]
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if ".mlp.experts." in name:
                v = p.detach().numpy()
                p.copy_(torch.from_numpy(dequantize(quantize(v, t), t).reshape(v.shape)))
    return hf


# ------------------------------------------------------------------------------------------------ tests

@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    return request.param, build(request.param)


def _moe_layers(model):
    return [m for m in model.modules if isinstance(m, ExLlamaV2MoEMLP)]


@pytest.mark.parametrize("qtype", ["F32", "F16"])
def test_float_experts_match_hf(case, qtype, tmp_path):
    name, hf = case
    path = write_moe_gguf(hf, str(tmp_path / f"{name}.gguf"), qtype)
    oracle = hf if qtype == "F32" else hf_on_dequantised_experts(hf, "F16")
    runner = ParityRunner(path, oracle, prompt_len=12, decode_steps=3, max_seq_len=32)
    model = runner.check_prefill_and_decode()
    assert model.config.architecture == type(hf).__name__
    assert all(m.w1[0].weight is not None for m in _moe_layers(model))


def test_quantized_experts_stay_packed_and_match_hf(case, tmp_path):
    name, hf = case
    qtype = QUANT[name]
    path = write_moe_gguf(hf, str(tmp_path / f"{name}.gguf"), qtype)
    runner = ParityRunner(path, hf_on_dequantised_experts(hf, qtype), prompt_len=12, decode_steps=3, max_seq_len=32)
    model = runner.check_prefill_and_decode()
    moes = _moe_layers(model)
    assert len(moes) == sum(1 for k in hf.state_dict() if k.endswith("mlp.gate.weight"))
    for moe in moes:
        E, I = moe.num_experts, moe.interm_features
        for e in range(E):
            for lin, part in ((moe.w1[e], "gate"), (moe.w3[e], "up"), (moe.w2[e], "down")):
                q = lin.q_handle
                assert isinstance(q, GgufWeight) and lin.weight is None, lin.key
                (src, tensor, rows), = q.parts
                assert src.gguf_name(tensor) == f"blk.{moe.layer_idx}.ffn_{part}_exps.weight"
                # the expert's rows of the 3-D tensor, as stored
                qt, data, shape = src.raw(tensor)
                stacked = src._gguf_tensors[src.gguf_name(tensor)]
                all_rows = np.asarray(stacked.data).reshape(E * rows, -1)
                assert qt == qtype and np.shares_memory(data, all_rows)
                assert np.array_equal(data, all_rows[e * rows:(e + 1) * rows])
    dense = runner.load(gguf_dequantize=True)
    assert all(m.w1[0].q_handle is None for m in _moe_layers(dense))
    ids = runner.ids[:, :12]
    torch.testing.assert_close(dense.forward(ids), model.forward(ids), atol=1e-4, rtol=0)


def test_convert_gguf_to_hf_writes_per_expert_tensors_hf_reads(case, tmp_path):
    from exllamav2.gguf import convert_gguf_to_hf
    name, hf = case
    path = write_moe_gguf(hf, str(tmp_path / f"{name}.gguf"), "F16")
    with pytest.warns(UserWarning, match="no tokenizer"):
        out = convert_gguf_to_hf(path, str(tmp_path / "hf"), dtype=torch.float32, progress=False)
    reread = tf.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, COMMON["vocab_size"], (1, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(reread(ids).logits, hf_on_dequantised_experts(hf, "F16")(ids).logits,
                                   atol=1e-4, rtol=0)


def test_wrong_expert_count_is_refused(tmp_path):
    hf = build("qwen3_moe")
    path = write_moe_gguf(hf, str(tmp_path / "bad.gguf"), expert_count=hf.config.num_experts + 1)
    with pytest.raises(GGUFError) as e:
        GGUFFile(path)
    msg = str(e.value)
    assert path in msg and "blk.0.ffn_gate_exps.weight" in msg
    assert f"expected [{hf.config.num_experts + 1}, 32, 64]" in msg and "'qwen3moe.expert_count'" in msg


@pytest.mark.parametrize("name,field", [("mixtral", "expert_used_count"), ("qwen3_moe", "expert_feed_forward_length"),
                                        ("qwen2_moe", "expert_shared_feed_forward_length"),
                                        ("qwen3_moe", "expert_count"), ("mixtral", "expert_count")])
def test_missing_metadata_is_refused(name, field, tmp_path):
    path = write_moe_gguf(build(name), str(tmp_path / "bad.gguf"), omit=(field,))
    with pytest.raises(GGUFError) as e:
        ExLlamaV2Config(path)
    msg = str(e.value)
    assert path in msg and f"'{GGUF_ARCH[name]}.{field}'" in msg
    # a "llama" file without the count reads as dense Llama: its expert tensors are unknown there, and said why
    assert ("is missing" in msg) != (name == "mixtral" and field == "expert_count"), msg


def test_unknown_or_unsupported_architectures_are_refused(tmp_path):
    hf = build("qwen3_moe")
    with pytest.raises(GGUFError, match="'deepseek2' is not supported"):
        GGUFFile(write_moe_gguf(hf, str(tmp_path / "a.gguf"), arch="deepseek2"))
    # a family llama.cpp writes without experts only
    with pytest.raises(GGUFError, match="'qwen3' with experts"):
        GGUFFile(write_moe_gguf(hf, str(tmp_path / "b.gguf"), arch="qwen3"))


def test_triton_device_routed_gguf_experts(tmp_path, monkeypatch):
    """fp16 under the Triton interpreter: the Q8_0 experts run the device-routed MoE kernels and decode the torch
    backend's greedy tokens."""
    pytest.importorskip("triton")
    from test_triton_moe import greedy, spy_grouped_device
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ops.set_backend(None)
    try:
        cfg = ExLlamaV2Config(write_moe_gguf(build("mixtral"), str(tmp_path / "m.gguf"), "Q8_0"))
        cfg.dtype = torch.float16
        cfg.max_seq_len = 32
        model = ExLlamaV2(cfg)
        model.load()
        calls = spy_grouped_device(monkeypatch)
        ids = torch.randint(0, COMMON["vocab_size"], (1, 6), generator=torch.Generator().manual_seed(3))
        ref = greedy(model, ids, 3, "torch", max_seq_len=32)
        assert not calls
        got = greedy(model, ids, 3, None, max_seq_len=32)
        assert torch.equal(got, ref)
        moes = _moe_layers(model)
        assert calls and len(calls) >= 3 * len(moes)
        assert all(m.device_path_declined is None for m in moes)
        assert all(isinstance(lin.q_handle, GgufWeight) for m in moes for lin in m.experts)
    finally:
        ops.set_backend(None)


def k_quant_experts(hf, qtype: str, seed: int = 0) -> dict:
    """Random `qtype` blocks for every stacked expert tensor of `hf` ({GGUF name: uint8 (E, rows, bytes)}), with
    `hf`'s expert weights set to their values, so HF holds what the file will."""
    from test_gguf_support import random_kquant_blocks
    rng, t = np.random.default_rng(seed), GGMLQuantizationType[qtype]
    raw = {}
    with torch.no_grad():
        for i in range(hf.config.num_hidden_layers):
            experts = hf.model.layers[i].mlp.experts
            E, two_i, H = experts.gate_up_proj.shape
            I = two_i // 2
            for part, param, rows in (("gate", experts.gate_up_proj[:, :I], I), ("up", experts.gate_up_proj[:, I:], I),
                                      ("down", experts.down_proj, H)):
                blocks = random_kquant_blocks((E * rows, param.shape[-1]), qtype, rng, scale=0.05)
                raw[f"blk.{i}.ffn_{part}_exps.weight"] = blocks.reshape(E, rows, -1)  # 3-D, as llama.cpp stacks
                param.copy_(torch.from_numpy(dequantize(blocks, t).reshape(param.shape).copy()))
    return raw


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K", "IQ2_XS", "IQ3_XXS"])
def test_k_quant_experts_match_hf(qtype, tmp_path):
    """K-quant and lattice experts (super-blocks of 256 columns: a model 256 wide), kept as the file's blocks,
    against HF holding the blocks' values."""
    model_cls, cfg_cls, extra = CASES["mixtral"]
    hf = make_tiny(model_cls, cfg_cls(**{**COMMON, **extra, "hidden_size": 256, "intermediate_size": 256,
                                         "head_dim": 64}), seed=7, init_scale=0.05)
    raw = k_quant_experts(hf, qtype)
    path = write_moe_gguf(hf, str(tmp_path / f"k_{qtype}.gguf"), qtype, raw_experts=raw)
    # fp32: the CPU runs the experts' exact dequantised matmul (ops/cpu/linear.py); 256-wide rows of fp32 sums
    runner = ParityRunner(path, hf, prompt_len=8, decode_steps=2, max_seq_len=32, tol=1e-3)
    model = runner.check_prefill_and_decode()
    for moe in _moe_layers(model):
        assert all(isinstance(lin.q_handle, GgufWeight) and set(lin.q_handle.types) == {qtype} for lin in moe.experts)
    # bf16: every expert through the CPU's GEMV on its own rows of the file's blocks (no dense copy), the logits
    # within bf16's reach of the fp32 model's
    from exllamav2.ops.cpu import kernels
    from exllamav2.ops.cpu.gemv_linear import GgufGemvKernel
    if kernels.ready():
        bf16 = runner.load("bfloat16")
        got = bf16.forward(runner.ids).float()
        for moe in _moe_layers(bf16):
            assert all(isinstance(lin.kernel(torch.bfloat16), GgufGemvKernel) for lin in moe.experts)
        assert ((got - runner.ref).norm() / runner.ref.norm()).item() < 0.03


@pytest.mark.parametrize("qtype", ["F32", "Q8_0", "Q5_1"])
def test_per_expert_tensors_of_older_files(qtype, tmp_path):
    """llama.cpp's Mixtral layout before the stacked tensors (one 2-D tensor per expert, blk.N.ffn_gate.E.weight):
    the same model as the stacked file gives."""
    hf = build("mixtral")
    want = hf if qtype == "F32" else hf_on_dequantised_experts(hf, qtype)
    path = write_moe_gguf(hf, str(tmp_path / "old.gguf"), qtype, per_expert=True)
    gguf_file = GGUFFile(path)
    assert "blk.0.ffn_gate.3.weight" in {gguf_file.gguf_name(k) for k in gguf_file.keys()}
    model = ParityRunner(path, want, prompt_len=8, decode_steps=2, max_seq_len=32).check_prefill_and_decode()
    if qtype != "F32":
        assert all(isinstance(lin.q_handle, GgufWeight) for m in _moe_layers(model) for lin in m.experts)


@pytest.mark.slow
def test_compiled_decode_of_a_gguf_moe_model_gives_eager_tokens(tmp_path):
    """model.compile_decode() on a Q8_0 Qwen3-MoE GGUF (the experts as one opaque op in the graph,
    moe_grouped_op.py): one graph, run without dynamo after its first call, eager's greedy tokens for 2 rows
    (~15 s, the compile)."""
    cfg = ExLlamaV2Config(write_moe_gguf(build("qwen3_moe"), str(tmp_path / "m.gguf"), "Q8_0"))
    cfg.max_seq_len = 64
    model = ExLlamaV2(cfg)
    model.load()
    ids = torch.randint(0, COMMON["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(1))

    def greedy():
        cache = ExLlamaV2Cache(model, batch_size=2, max_seq_len=64)
        logits = model.forward(ids, cache, last_id_only=True)[:, -1]
        out = []
        for _ in range(5):
            out.append(logits.argmax(-1, keepdim=True))
            logits = model.forward(out[-1], cache)[:, -1]
        return torch.cat(out, 1)

    with torch.inference_mode():
        eager = greedy()
    runner = model.compile_decode(max_seq_len=64, progress=False)
    try:
        with torch.inference_mode():
            assert torch.equal(greedy(), eager)
        assert not runner.graph_breaks and runner.trusted.direct > 0
    finally:
        model.decode_runner = None
