"""exllamav2.fast against the reference path: a tiny random Llama (bf16, int8, int4, shared cache, batches,
GGUF block decoding) and SmolLM2 from its Q4_1 GGUF. The SmolLM2 and compiled-step checks are marked slow
(`pytest -m slow tests/test_fast_path.py`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
from exllamav2.fast import FastDecoder, FastPathUnsupported, unsupported_reason
from exllamav2.fast.gguf_blocks import decode_blocks, dequantize_digits
from exllamav2.fast.linears import DenseLinear, Int4Linear, Int8Linear

PROMPT, STEPS, MAX_LEN = 24, 6, 64


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=320, num_hidden_layers=3,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    m = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
            else:
                p.normal_(1.0, 0.1)
    path = tmp_path_factory.mktemp("tiny_llama")
    m.save_pretrained(str(path), safe_serialization=True)
    return str(path)


def load(path, max_len=MAX_LEN):
    cfg = ExLlamaV2Config(path)
    cfg.dtype = "bfloat16"
    cfg.max_seq_len = max_len
    model = ExLlamaV2(cfg)
    model.load()
    return model


def ids_for(vocab, b=1, n=PROMPT + STEPS, seed=3):
    return torch.randint(0, vocab, (b, n), generator=torch.Generator().manual_seed(seed))


def run_reference(model, ids, prompt=PROMPT):
    cache = ExLlamaV2Cache(model, batch_size=ids.shape[0], max_seq_len=MAX_LEN)
    out = [model.forward(ids[:, :prompt], cache, last_id_only=True)[:, -1]]
    for i in range(prompt, ids.shape[1]):
        out.append(model.forward(ids[:, i:i + 1], cache)[:, -1])
    return torch.stack(out, 1)


def run_fast(fd, ids, prompt=PROMPT, cache=None):
    out = [fd(ids[:, :prompt], cache)[:, -1]]
    for i in range(prompt, ids.shape[1]):
        out.append(fd(ids[:, i:i + 1], cache)[:, -1])
    return torch.stack(out, 1)


def assert_close_bf16(got, ref, rel=0.03, min_agree=0.8):
    """bf16 paths differ in rounding order; demand agreement to a few % of the logit range and equal argmax
    wherever the reference's top two logits are not nearly tied."""
    span = ref.abs().max().item()
    assert (got - ref).abs().max().item() <= rel * span, f"max diff {(got - ref).abs().max().item()} vs span {span}"
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * rel * span
    assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= min_agree


def reference_with_fast_weights(path, fd):
    """A reference model whose linears hold the fast decoder's weights, dequantized."""
    model = load(path)
    mods = model.modules
    for i, layer in enumerate(fd.layers):
        attn, mlp = mods[1 + 2 * i], mods[2 + 2 * i]
        for fused, parts in ((layer.qkv, (attn.q_proj, attn.k_proj, attn.v_proj)), (layer.o, (attn.o_proj,)),
                             (layer.gate_up, (mlp.gate_proj, mlp.up_proj)), (layer.down, (mlp.down_proj,))):
            w = fused.dense_weight()
            for lin, chunk in zip(parts, w.split([p.out_features for p in parts])):
                lin.weight = torch.nn.Parameter(chunk.clone(), requires_grad=False)
    mods[-1].weight = torch.nn.Parameter(fd.head.dense_weight().clone(), requires_grad=False)
    return model


# ---------------------------------------------------------------------------------------------- tiny Llama

def test_bf16_eager_equals_reference(tiny_dir):
    model = load(tiny_dir)
    ids = ids_for(model.config.vocab_size)
    ref = run_reference(model, ids)
    fd = FastDecoder(model, max_seq_len=MAX_LEN, weights="bf16")
    assert fd.kind == "bf16" and not fd.compiled
    assert_close_bf16(run_fast(fd, ids), ref)


@pytest.mark.parametrize("kind,cls", [("int8", Int8Linear), ("int4", Int4Linear)])
def test_quantized_eager_equals_reference_with_same_weights(tiny_dir, kind, cls):
    model = load(tiny_dir)
    fd = FastDecoder(model, max_seq_len=MAX_LEN, weights=kind)
    assert all(isinstance(lin, cls) for lin in fd.all_linears())
    ref_model = reference_with_fast_weights(tiny_dir, fd)
    # the fast prefill uses dense weights: give it the same dequantized ones
    fd_same = FastDecoder(ref_model, max_seq_len=MAX_LEN, weights="bf16")
    ids = ids_for(model.config.vocab_size)
    ref = run_reference(ref_model, ids)
    assert_close_bf16(run_fast(fd_same, ids), ref)
    # decode steps through the int kernels, after a reference prefill in a shared-layout buffer
    fd.reset()
    fd(ids[:, :PROMPT])
    for li, layer in enumerate(fd.layers):      # same KV as the reference prefill would have written
        layer.k.copy_(fd_same.layers[li].k)
        layer.v.copy_(fd_same.layers[li].v)
    steps = torch.stack([fd(ids[:, i:i + 1])[:, -1] for i in range(PROMPT, ids.shape[1])], 1)
    assert_close_bf16(steps, ref[:, 1:])
    # and the quantization itself stays near the original weights
    orig = model.modules[1].q_proj.weight.float()
    deq = ref_model.modules[1].q_proj.weight.float()
    assert (deq - orig).abs().max() < (0.02 if kind == "int8" else 0.1) * orig.abs().max()


def test_shared_cache_takes_turns_with_reference(tiny_dir):
    model = load(tiny_dir)
    ids = ids_for(model.config.vocab_size)
    ref = run_reference(model, ids)
    cache = ExLlamaV2Cache(model, max_seq_len=MAX_LEN)
    fd = FastDecoder(model, cache, weights="bf16")
    model.forward(ids[:, :PROMPT], cache, preprocess_only=True)      # reference prefill
    got = [fd(ids[:, i:i + 1], cache)[:, -1] for i in range(PROMPT, PROMPT + 3)]
    got += [model.forward(ids[:, i:i + 1], cache)[:, -1] for i in range(PROMPT + 3, ids.shape[1])]
    assert cache.current_seq_len == ids.shape[1]
    assert_close_bf16(torch.stack(got, 1), ref[:, 1:])
    with pytest.raises(ValueError, match="another cache"):
        fd(ids[:, :1], None)


def test_batch_rows_equal_single_rows(tiny_dir):
    model = load(tiny_dir)
    ids = ids_for(model.config.vocab_size, b=3)
    batched = run_fast(FastDecoder(model, max_seq_len=MAX_LEN, batch_size=3, weights="int4"), ids)
    single = FastDecoder(model, max_seq_len=MAX_LEN, batch_size=1, weights="int4")
    for r in range(3):
        single.reset()
        assert_close_bf16(batched[r:r + 1], run_fast(single, ids[r:r + 1]), rel=0.01)


def test_limits_and_unsupported(tiny_dir):
    model = load(tiny_dir)
    fd = FastDecoder(model, max_seq_len=8, weights="bf16")
    with pytest.raises(ValueError, match="max_seq_len=8"):
        fd(ids_for(model.config.vocab_size, n=9))
    with pytest.raises(ValueError, match="weights='int3'"):
        FastDecoder(model, weights="int3")
    model.config.final_logit_softcapping = 30.0
    assert "soft-capping" in unsupported_reason(model)
    with pytest.raises(FastPathUnsupported, match="soft-capping"):
        FastDecoder(model)


# ---------------------------------------------------------------------------------------------- weight formats

@pytest.mark.parametrize("gtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_decode_like_gguf_library(gtype):
    qt = GGMLQuantizationType[gtype]
    w = np.random.default_rng(0).standard_normal((48, 96)).astype(np.float32)
    raw = quantize(w, qt)
    expect = dequantize(raw, qt).reshape(48, 96)
    blocks = decode_blocks(gtype, raw.view(np.uint8).reshape(48, -1), (48, 96))
    assert np.array_equal(dequantize_digits(blocks).numpy(), expect)
    x = torch.randn(2, 96).to(torch.bfloat16)
    lin = Int4Linear.from_blocks(blocks) if blocks.kind == "int4" else Int8Linear.quantize(torch.from_numpy(expect))
    ref = x.float() @ torch.from_numpy(expect).T
    assert (lin(x).float() - ref).abs().max() < 0.02 * ref.abs().max()
    with pytest.raises(ValueError, match="expected \\[48"):
        decode_blocks(gtype, raw.view(np.uint8).reshape(48, -1)[:, :-2], (48, 96), "blk.0.attn_q.weight")


def test_linear_kinds_match_dense_matmul():
    w = torch.randn(40, 64)
    x = torch.randn(3, 64).to(torch.bfloat16)
    for lin in (DenseLinear(w), Int8Linear.quantize(w), Int4Linear.quantize(w)):
        ref = x.float() @ lin.dense_weight().float().T
        assert lin(x).shape == (3, 40)
        assert (lin(x).float() - ref).abs().max() < 0.02 * ref.abs().max(), lin.kind
    dense = DenseLinear(w)
    dense.prepack()
    assert (dense(x).float() - x.float() @ dense.weight.float().T).abs().max() < 0.02 * 8


# ---------------------------------------------------------------------------------------------- SmolLM2

@pytest.mark.slow
def test_smollm2_native_int4_matches_reference(smollm2_gguf):
    model = load(smollm2_gguf, max_len=MAX_LEN)
    fd = FastDecoder(model, max_seq_len=MAX_LEN)          # auto: the GGUF's own Q4_1 blocks
    assert fd.kind == "int4" and isinstance(fd.layers[0].qkv, Int4Linear)
    assert isinstance(fd.head, Int8Linear)                 # the Q8_0 embedding stays 8-bit
    from exllamav2.tokenizer import ExLlamaV2Tokenizer
    ids = ExLlamaV2Tokenizer(model.config).encode("The capital of France is Paris. The capital of Germany is Berlin. "
                                                  "The capital of Italy is")
    ref = run_reference(model, ids, prompt=ids.shape[1] - 4)
    got = run_fast(fd, ids, prompt=ids.shape[1] - 4)
    # Q4_1 maps exactly onto int4 g32 up to bf16 scales; the head is requantized from Q8_0 to per-row int8
    assert_close_bf16(got, ref, rel=0.06, min_agree=0.6)


# ---------------------------------------------------------------------------------------------- compiled

@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bf16", "int4"])
def test_compiled_step_equals_eager(tiny_dir, kind):
    model = load(tiny_dir)
    ids = ids_for(model.config.vocab_size)
    eager = run_fast(FastDecoder(model, max_seq_len=MAX_LEN, weights=kind), ids)
    fd = FastDecoder(model, max_seq_len=MAX_LEN, weights=kind, compile=True, progress=False)
    assert fd.compiled
    assert_close_bf16(run_fast(fd, ids), eager)


def test_streaming_generator_uses_fast_path_unless_intervened(tiny_dir):
    """The streaming generator decodes through FastDecoder when enabled, with logits close to the reference,
    and falls back to the reference modules while an Intervention is registered."""
    from exllamav2.generator.sampler import ExLlamaV2Sampler
    from exllamav2.generator.streaming import ExLlamaV2StreamingGenerator
    from exllamav2.module import Intervention

    model = load(tiny_dir)

    from exllamav2 import ExLlamaV2Tokenizer
    from exllamav2.default_models import smollm2_gguf_path
    tok = ExLlamaV2Tokenizer(ExLlamaV2Config(smollm2_gguf_path()))  # a real tokenizer; the tiny model uses ids < 512

    def run(enable, wrap):
        cache = ExLlamaV2Cache(model, max_seq_len=MAX_LEN)
        gen = ExLlamaV2StreamingGenerator(model, cache, tok)
        calls = []
        if enable:
            assert gen.enable_fast_path(weights="bf16", progress=False)
            inner = gen.fast_decoder
            gen.fast_decoder = lambda ids, c: calls.append(1) or inner(ids, c)
        original = model.modules[2]
        if wrap:
            model.modules[2] = Intervention(original)
        try:
            gen.begin_stream_ex(ids_for(512, n=PROMPT), ExLlamaV2Sampler.Settings.greedy(), return_logits=True,
                                max_new_tokens=4)
            logits = [gen.stream_ex()["logits"] for _ in range(4)]
        finally:
            model.modules[2] = original
        return torch.stack([l.view(-1) for l in logits]), len(calls)

    ref, _ = run(False, False)
    fast, n_fast = run(True, False)
    assert n_fast >= 3
    assert (fast[0] - ref[0]).abs().max().item() < 0.05 * max(1.0, ref[0].abs().max().item())
    _, n_wrapped = run(True, True)
    assert n_wrapped == 0
