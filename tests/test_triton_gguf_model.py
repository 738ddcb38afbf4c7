"""GGUF models on the `triton` backend under the Triton interpreter (CPU tensors): greedy decoding equal to the
torch backend, every quantized matrix held as the file's blocks (no dense copy). A tiny random K-quant model in the
default suite (the interpreter runs ~0.5 s per linear call here); SmolLM2-135M Q4_1 as a slow check; a tiny model
in each of Q2_K, Q3_K, IQ4_NL and IQ4_XS against its dense load. Also the other side of keeping the types without an
int4 mapping packed: the cpu backend runs them by its GEMV, or as the dense matrix a dense load gives."""

import pytest
import torch

pytest.importorskip("triton")

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ops  # noqa: E402
from exllamav2.fused_linear import FusedLinear  # noqa: E402
from exllamav2.gguf import GGUFFile  # noqa: E402
from exllamav2.linear import ExLlamaV2Linear  # noqa: E402
from exllamav2.quant.gguf import GgufWeight  # noqa: E402
from test_gguf_support import write_tiny_gguf  # noqa: E402

F16 = torch.float16


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def load(path, **opts):
    cfg = ExLlamaV2Config(path)
    cfg.dtype = F16
    cfg.max_seq_len = 64
    for k, v in opts.items():
        setattr(cfg, k, v)
    model = ExLlamaV2(cfg)
    model.load()
    return model


def greedy(model, ids, steps, backend, forced=None):
    """Prefill, then `steps` decode steps; the tokens chosen (or `forced`, to follow another run's tokens) and the
    last-position logits of every step."""
    with ops.use_backend(backend):
        cache = ExLlamaV2Cache(model, batch_size=1, max_seq_len=64)
        logits = [model.forward(ids, cache, last_id_only=True)[:, -1].float()]
        tokens = []
        for i in range(steps):
            tokens.append(int(logits[-1].argmax()) if forced is None else forced[i])
            logits.append(model.forward(torch.tensor([[tokens[-1]]]), cache)[:, -1].float())
    return tokens, torch.cat(logits)


def linears(model):
    return [m for m in model.modules_dict.values() if isinstance(m, ExLlamaV2Linear)]


def fused_groups(model):
    found = []
    for m in model.modules:
        found += [g for g in vars(m).values() if isinstance(g, FusedLinear) and g not in found]
    return found


def assert_triton_greedy_equals_torch(model, ids, steps):
    """Greedy decoding with the backends in their normal order (the linears and attention take the triton
    kernels, the other ops the cpu backend) against the torch backend following the same tokens, so that every
    step's logits compare. Checks the resident weights in between (the torch backend keeps dense copies)."""
    tokens, got = greedy(model, ids, steps, None)
    assert_only_file_blocks_resident(model)
    _, ref = greedy(model, ids, steps, "torch", forced=tokens)
    span = ref.abs().max().item()
    assert (got - ref).abs().max().item() <= 0.02 * span, ((got - ref).abs().max().item(), span)
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 0.04 * span
    assert clear.any()
    assert torch.equal(got.argmax(-1)[clear], ref.argmax(-1)[clear])
    return tokens


def assert_only_file_blocks_resident(model):
    """Every GGUF-quantized matrix runs a triton kernel over the file's blocks; none has a dense copy."""
    quantized = [lin for lin in linears(model) if isinstance(lin.q_handle, GgufWeight)]
    assert quantized
    file_bytes = resident = 0
    for group in fused_groups(model):
        k = group.kernel(F16)
        if k is not False and isinstance(group.parts[0].q_handle, GgufWeight):
            assert k.backend == "triton" and k.blocks.dtype == torch.uint8
            resident += k.nbytes()
            file_bytes += sum(p.q_handle.file_bytes() for p in group.parts)
    fused_parts = {id(p) for g in fused_groups(model) if g.kernel(F16) is not False for p in g.parts}
    for lin in quantized:
        assert lin.q_handle._dense is None, lin.key
        if id(lin) not in fused_parts:
            k = lin.kernel(F16)
            assert k.backend == "triton" and k.blocks.dtype == torch.uint8, lin.key
            resident += k.nbytes()
            file_bytes += lin.q_handle.file_bytes()
    assert resident == file_bytes


@pytest.mark.parametrize("qtype", ["Q4_K", pytest.param("Q6_K", marks=pytest.mark.slow)])
def test_tiny_kquant_model_greedy_on_triton_equals_torch(qtype, tmp_path):
    path = write_tiny_gguf(str(tmp_path / f"{qtype}.gguf"), qtype=qtype, hidden=256, heads=4, kv_heads=2,
                           ffn=512, layers=1, vocab=96, tied=False, seed=3)
    model = load(path)
    ids = torch.tensor([[1, 5, 9, 33, 60, 2, 17, 40]])
    assert_triton_greedy_equals_torch(model, ids, steps=3)


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS"])
def test_low_bit_model_on_triton_equals_the_dense_load(qtype, tmp_path):
    path = write_tiny_gguf(str(tmp_path / f"{qtype}.gguf"), qtype=qtype, hidden=256, heads=4, kv_heads=2, ffn=256,
                           layers=1, vocab=64, tied=False, seed=5)
    model = load(path)
    assert all(isinstance(lin.q_handle, GgufWeight) and lin.q_handle.types == [qtype] and lin.weight is None
               for lin in linears(model))
    ids = torch.tensor([[1, 7, 3, 20, 11, 40]])
    got = model.forward(ids).float()
    assert_only_file_blocks_resident(model)
    dense = load(path, gguf_dequantize=True)
    assert all(lin.q_handle is None for lin in linears(dense))
    with ops.use_backend("torch"):
        want = dense.forward(ids).float()
    span = want.abs().max().item()
    assert (got - want).abs().max().item() <= 0.02 * span, ((got - want).abs().max().item(), span)


@pytest.mark.slow
def test_smollm2_q4_1_greedy_on_triton_equals_torch(smollm2_gguf):
    # ~35k interpreted tile iterations per forward (30 layers and the 49k-row tied head): tens of minutes here
    from exllamav2 import ExLlamaV2Tokenizer
    model = load(smollm2_gguf)
    tokenizer = ExLlamaV2Tokenizer(model.config)
    ids = tokenizer.encode("The capital of France is")
    tokens = assert_triton_greedy_equals_torch(model, ids, steps=1)
    assert tokens == greedy(model, ids, 1, "torch")[0]


@pytest.mark.parametrize("qtype", ["Q5_K", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS"])
def test_dense_on_cpu_model_on_cpu_backend_equals_the_dense_load(qtype, tmp_path, monkeypatch):
    # a type the cpu backend has a GEMV for runs there; the others run as the dense load's matrix
    monkeypatch.delenv("TRITON_INTERPRET")
    path = write_tiny_gguf(str(tmp_path / f"{qtype}.gguf"), qtype=qtype, hidden=256, heads=4, kv_heads=2, ffn=256,
                           layers=1, vocab=64, seed=4)

    def load_bf16(**opts):
        cfg = ExLlamaV2Config(path)
        cfg.dtype = torch.bfloat16
        for k, v in opts.items():
            setattr(cfg, k, v)
        model = ExLlamaV2(cfg)
        model.load()
        return model

    model = load_bf16()
    assert all(isinstance(lin.q_handle, GgufWeight) and lin.q_handle.types == [qtype] and lin.weight is None
               for lin in linears(model) if lin.key.startswith("model.layers."))
    ids = torch.tensor([[1, 7, 3, 20, 11]])
    with ops.use_backend("cpu"):
        down = model.modules_dict["model.layers.0.mlp.down_proj"]
        k = down.kernel(torch.bfloat16)
        assert type(k).__name__ in ("DequantizedKernel", "GgufGemvKernel")
        if type(k).__name__ == "DequantizedKernel":
            assert torch.equal(k.weight, GGUFFile(path).get_tensor(down.key + ".weight", dtype=torch.bfloat16))
        got = model.forward(ids)
    with ops.use_backend("torch"):
        ref = model.forward(ids)
    assert (got - ref).abs().max().item() <= 0.02 * ref.abs().max().item()
    dense = load_bf16(gguf_dequantize=True)
    assert all(lin.q_handle is None for lin in linears(dense))
    with ops.use_backend("cpu"):
        want = dense.forward(ids)
    assert (got - want).abs().max().item() <= 0.02 * want.abs().max().item()
