"""Fused tensors: Phi-3 (fused qkv_proj / gate_up_proj, longrope) and GPT-2 (Conv1D c_attn stored transposed,
learned positions) against HF transformers, and `load_weight_fused` on hand-built safetensors files: plain slices,
a transposed source, the altpack / per-head interleaved layout, biases, and errors for tensors of the wrong size."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel, Phi3Config, Phi3ForCausalLM

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
from exllamav2.linear import ExLlamaV2Linear
from exllamav2.module import TensorShapeError, fused_row_index, row_runs
from parity import ParityRunner, make_tiny, save_hf_model

PHI3 = dict(vocab_size=131, hidden_size=48, intermediate_size=88, num_hidden_layers=3, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=128, pad_token_id=None, bos_token_id=1, eos_token_id=2)

CASES = {
    "phi3": (Phi3ForCausalLM, Phi3Config(**PHI3)),
    "phi3_longrope": (Phi3ForCausalLM, Phi3Config(**PHI3, original_max_position_embeddings=24,
                                                  rope_scaling={"rope_type": "longrope",
                                                                "long_factor": [1.0 + 0.3 * i for i in range(4)],
                                                                "short_factor": [1.0 + 0.05 * i for i in range(4)]})),
    "gpt2": (GPT2LMHeadModel, GPT2Config(vocab_size=131, n_embd=48, n_layer=3, n_head=6, n_inner=88, n_positions=64)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def runner(request, tmp_path_factory):
    model_cls, cfg = CASES[request.param]
    hf = make_tiny(model_cls, cfg, seed=sum(map(ord, request.param)), init_scale=0.08)
    path = save_hf_model(hf, tmp_path_factory.mktemp(request.param))
    # longrope switches frequencies once the sequence passes original_max_position_embeddings, so a cached
    # decode legitimately differs from one full pass (HF behaves the same way)
    return request.param, ParityRunner(path, hf, cache_equals_full=request.param != "phi3_longrope")


def test_parity(runner):
    name, r = runner
    assert r.ref.std().item() > 0.05
    r.run_all()


@pytest.mark.parametrize("runner", ["phi3_longrope"], indirect=True)
def test_longrope_is_read(runner):
    name, r = runner
    cfg = ExLlamaV2Config(r.model_dir)
    rp = cfg.rope_parameters["full_attention"]
    assert rp["rope_type"] == "longrope" and rp["original_max_position_embeddings"] == 24
    assert r.ids.shape[1] > 24  # the run crosses into the long factors


@pytest.mark.parametrize("runner", ["gpt2"], indirect=True)
def test_gpt2_positions_bounded(runner):
    name, r = runner
    model = r.load()
    assert model.modules[1].name == "PosEmbedding"
    n = model.modules[1].max_positions
    with pytest.raises(ValueError, match=r"transformer\.wpe: position .* beyond"):
        model.forward(torch.zeros(1, n + 1, dtype=torch.long))


# ---------------------------------------------------------------- load_weight_fused on hand-built files

H, HKV, D, IN = 4, 2, 3, 10  # 2 q heads per KV head
G = H // HKV
ROWS = (H + 2 * HKV) * D
FUSED = "gpt_neox.layers.0.attention.query_key_value"


def _folder(tmp_path, tensors: dict, **cfg_extra):
    cfg = dict(architectures=["GPTNeoXForCausalLM"], vocab_size=7, hidden_size=IN, num_hidden_layers=1,
               num_attention_heads=H, num_key_value_heads=HKV, head_dim=D, intermediate_size=8,
               max_position_embeddings=32, **cfg_extra)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    c = ExLlamaV2Config(str(tmp_path))
    c.dtype = "float32"
    return ExLlamaV2(c)


def _altpack_reference(w: torch.Tensor):
    """q, k, v rows of an altpack tensor built row by row: KV head j's block is [q_{jG}, .., q_{jG+G-1}, k_j, v_j]."""
    block = (G + 2) * D
    q = [w[(h // G) * block + (h % G) * D + i] for h in range(H) for i in range(D)]
    k = [w[j * block + G * D + i] for j in range(HKV) for i in range(D)]
    v = [w[j * block + (G + 1) * D + i] for j in range(HKV) for i in range(D)]
    return torch.stack(q), torch.stack(k), torch.stack(v)


def _linears(model, altpack: bool):
    mk = lambda name, beg, end: ExLlamaV2Linear(model, f"x.{name}", IN, end - beg, True, f_key=FUSED, f_beg=beg,
                                                 f_end=end, altpack_qkv=altpack, fused_rows=ROWS)
    return (mk("q", 0, H * D), mk("k", H * D, (H + HKV) * D), mk("v", (H + HKV) * D, ROWS))


@pytest.mark.parametrize("stored_transposed", [False, True])
def test_altpack_slices(tmp_path, stored_transposed):
    w = torch.arange(ROWS * IN, dtype=torch.float32).view(ROWS, IN)
    b = torch.arange(ROWS, dtype=torch.float32) * -1.0
    model = _folder(tmp_path, {FUSED + ".weight": w.T if stored_transposed else w, FUSED + ".bias": b})
    q, k, v = _linears(model, altpack=True)
    for lin, ref_w, ref_b in zip((q, k, v), _altpack_reference(w), _altpack_reference(b.unsqueeze(1))):
        lin.load()
        assert torch.equal(lin.weight, ref_w), lin.key
        assert torch.equal(lin.bias, ref_b.squeeze(1)), lin.key


def test_plain_slices_and_transposed(tmp_path):
    w = torch.randn(ROWS, IN)
    b = torch.randn(ROWS)
    model = _folder(tmp_path, {FUSED + ".weight": w.T, FUSED + ".bias": b})  # (in, rows): found by its shape
    for lin in _linears(model, altpack=False):
        lin.load()
        assert torch.equal(lin.weight, w[lin.f_beg:lin.f_end]) and torch.equal(lin.bias, b[lin.f_beg:lin.f_end])


def test_per_head_interleave_is_a_strided_selection():
    # MHA altpack is GPT-NeoX's [q_h, k_h, v_h] per head: each projection is one run of D rows per head
    d, heads = 5, 3
    cfg = type("Cfg", (), dict(num_attention_heads=heads, num_key_value_heads=heads, head_dim=d))
    rows = 3 * heads * d
    for part in range(3):
        index = fused_row_index(rows, part * heads * d, (part + 1) * heads * d, cfg)
        assert row_runs(index) == [(h * 3 * d + part * d, h * 3 * d + (part + 1) * d) for h in range(heads)]
    assert row_runs(fused_row_index(rows, 0, rows)) == [(0, rows)]


def test_wrong_size_fused_tensor_names_tensor_and_rows(tmp_path):
    model = _folder(tmp_path, {FUSED + ".weight": torch.zeros(ROWS - D, IN), FUSED + ".bias": torch.zeros(ROWS - D)})
    for altpack in (False, True):
        q = _linears(model, altpack)[0]
        with pytest.raises(TensorShapeError, match=rf"{FUSED}\.weight: .*expected {ROWS} rows"):
            q.load()


def test_wrong_input_features_and_bias(tmp_path):
    model = _folder(tmp_path, {FUSED + ".weight": torch.zeros(ROWS, IN + 1), FUSED + ".bias": torch.zeros(ROWS)})
    with pytest.raises(TensorShapeError, match=rf"{FUSED}\.weight: fused tensor has shape \[{ROWS}, {IN + 1}\].*{IN} input"):
        _linears(model, False)[0].load()
    model = _folder(tmp_path, {FUSED + ".weight": torch.zeros(ROWS, IN), FUSED + ".bias": torch.zeros(ROWS + 1)})
    with pytest.raises(TensorShapeError, match=rf"{FUSED}\.bias: fused bias has {ROWS + 1} entries, expected {ROWS}"):
        _linears(model, True)[1].load()


def test_whole_model_reports_fused_tensor(tmp_path):
    # a full GPT-NeoX layer (MHA) built by hand with a short query_key_value: model.load() names it
    hidden, heads = 12, 3
    t = {"gpt_neox.embed_in.weight": torch.zeros(7, hidden), "embed_out.weight": torch.zeros(7, hidden),
         "gpt_neox.final_layer_norm.weight": torch.ones(hidden), "gpt_neox.final_layer_norm.bias": torch.zeros(hidden)}
    p = "gpt_neox.layers.0."
    for n in ("input_layernorm", "post_attention_layernorm"):
        t[p + n + ".weight"], t[p + n + ".bias"] = torch.ones(hidden), torch.zeros(hidden)
    t[p + "attention.query_key_value.weight"] = torch.zeros(3 * hidden - 1, hidden)
    t[p + "attention.query_key_value.bias"] = torch.zeros(3 * hidden - 1)
    t[p + "attention.dense.weight"], t[p + "attention.dense.bias"] = torch.zeros(hidden, hidden), torch.zeros(hidden)
    t[p + "mlp.dense_h_to_4h.weight"], t[p + "mlp.dense_h_to_4h.bias"] = torch.zeros(8, hidden), torch.zeros(8)
    t[p + "mlp.dense_4h_to_h.weight"], t[p + "mlp.dense_4h_to_h.bias"] = torch.zeros(hidden, 8), torch.zeros(hidden)
    (tmp_path / "config.json").write_text(json.dumps(dict(
        architectures=["GPTNeoXForCausalLM"], vocab_size=7, hidden_size=hidden, num_hidden_layers=1,
        num_attention_heads=heads, intermediate_size=8, max_position_embeddings=32, rotary_pct=0.5)))
    save_file(t, str(tmp_path / "model.safetensors"))
    model = ExLlamaV2(ExLlamaV2Config(str(tmp_path)))
    with pytest.raises(TensorShapeError, match=rf"{p}attention\.query_key_value\.weight: .*expected {3 * hidden} rows"):
        model.load()
