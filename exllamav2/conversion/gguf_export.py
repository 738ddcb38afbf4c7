"""An HF model folder written as an F16 GGUF file (the input llama.cpp's `llama-quantize` takes), with the `gguf`
library's writer. Tensor names come from the family's GGUF table (exllamav2/architectures/, GGUFArch.block_names),
inverted; metadata are the fields exllamav2/gguf/metadata.py reads back. Used by bench/quant_peers.py."""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from ..architecture import gguf_architectures
from ..config import ExLlamaV2Config
from ..gguf.header import read_header
from ..gguf.names import TOP_LEVEL

DECODER_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def permute_rotary_rows(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order for rotary embedding in interleaved form (the inverse of
    exllamav2/gguf/layout.unpermute_rotary_rows)."""
    half = rows.shape[0] // num_heads // 2
    if half * 2 * num_heads != rows.shape[0]:
        raise ValueError(f"{rows.shape[0]} rows do not split into {num_heads} heads of rotary pairs")
    grouped = rows.reshape(num_heads, 2, half, *rows.shape[1:])
    return np.ascontiguousarray(grouped.swapaxes(1, 2)).reshape(rows.shape)


def _gguf_spec(cfg: ExLlamaV2Config, model_dir: str):
    specs = [s for s in gguf_architectures().values() if s.hf_architecture == cfg.architecture]
    if not specs:
        raise ValueError(f"{model_dir}: no GGUF name table for architecture {cfg.architecture} (families with one: "
                         f"{', '.join(sorted({s.hf_architecture for s in gguf_architectures().values()}))})")
    spec = specs[0]
    if spec.config is not None or spec.norm_offset or spec.top_names is not None:
        # these families need their own metadata/tensor conventions, which only the reader side implements
        raise ValueError(f"{model_dir}: writing GGUF for {cfg.architecture} (GGUF '{spec.name}') is not supported; "
                         "supported: llama-style families without family-specific GGUF metadata")
    return spec


def _hf_to_gguf_names(spec, num_layers: int) -> dict[str, str]:
    names = {f"{hf}.{kind}": f"{g}.{kind}" for g, hf in TOP_LEVEL.items() for kind in ("weight", "bias")}
    for i in range(num_layers):
        for g, hf in spec.block_names.items():
            for kind in ("weight", "bias"):
                names[f"model.layers.{i}.{hf}.{kind}"] = f"blk.{i}.{g}.{kind}"
    return names


def _add_tokenizer(writer, model_dir: str) -> bool:
    """The vocabulary of a BPE tokenizer.json (tokens, types, merges, special ids); False if there is none."""
    import gguf
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        return False
    with open(path, encoding="utf-8") as f:
        tok = json.load(f)
    model = tok.get("model", {})
    if model.get("type") != "BPE":
        return False
    vocab = dict(model["vocab"])
    added = {t["content"]: t for t in tok.get("added_tokens", [])}
    for t in added.values():
        vocab.setdefault(t["content"], t["id"])
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for text, i in vocab.items():
        tokens[i] = text
        special = added.get(text, {}).get("special", False)
        types[i] = gguf.TokenType.CONTROL if special else (
            gguf.TokenType.USER_DEFINED if text in added else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(model_dir, load_merges=True).add_to_gguf(writer, quiet=True)
    return True


@torch.inference_mode()
def write_f16_gguf(model_dir: str, out_path: str, progress: bool = True) -> str:
    """Write the model folder `model_dir` as an F16 GGUF file at out_path (norms and biases in F32); returns
    out_path. Raises ValueError naming the folder for families without a GGUF name table."""
    import gguf
    cfg = ExLlamaV2Config(model_dir)
    spec = _gguf_spec(cfg, model_dir)
    arch = spec.name
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        hf = json.load(f)
    rope_scaling = hf.get("rope_scaling")
    if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default"):
        raise ValueError(f"{model_dir}/config.json: rope_scaling {rope_scaling} cannot be written to GGUF by this "
                         "exporter (only unscaled rotary embedding)")
    names = _hf_to_gguf_names(spec, cfg.num_hidden_layers)
    fmap = cfg.tensor_file_map
    unknown = [n for n in fmap if n not in names and not n.endswith("rotary_emb.inv_freq")]
    if unknown:
        raise ValueError(f"{model_dir}: tensor(s) with no GGUF name for '{arch}': {', '.join(unknown[:8])}")

    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    writer = gguf.GGUFWriter(out_path, arch)
    writer.add_name(os.path.basename(os.path.normpath(model_dir)))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_context_length(int(hf.get("max_position_embeddings", cfg.max_seq_len)))
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_freq_base(float(hf.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(hf.get("rms_norm_eps", 1e-5)))
    writer.add_vocab_size(cfg.vocab_size)
    if not _add_tokenizer(writer, model_dir):  # with a vocabulary, SpecialVocab writes the special ids
        for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                         ("pad_token_id", writer.add_pad_token_id)):
            if isinstance(hf.get(key), int):
                add(hf[key])

    from tqdm.auto import tqdm
    for hf_name in tqdm(list(fmap), desc="F16 GGUF", unit="tensor", disable=not progress):
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        t = fmap[hf_name].get_tensor(hf_name, device="cpu").float().numpy()
        if spec.permuted_qk and ".self_attn.q_proj." in hf_name:
            t = permute_rotary_rows(t, cfg.num_attention_heads)
        elif spec.permuted_qk and ".self_attn.k_proj." in hf_name:
            t = permute_rotary_rows(t, cfg.num_key_value_heads)
        # llama.cpp keeps 1-D tensors (norms, biases) in F32; matrices in F16
        writer.add_tensor(names[hf_name], t.astype(np.float16 if t.ndim == 2 else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()
    return out_path


def gguf_decoder_bpw(path: str) -> tuple[float, dict[str, int]]:
    """Bits per weight of a GGUF file's decoder linears (attention and MLP projections of every block, stored
    bytes / elements) and a count of their ggml types."""
    bits, numel, types = 0, 0, {}
    for t in read_header(path).tensors:
        parts = t.name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in DECODER_LINEARS and parts[3] == "weight":
            bits += int(t.n_bytes) * 8
            numel += int(t.n_elements)
            types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    if numel == 0:
        raise ValueError(f"{path}: no decoder linear tensors (blk.N.attn_q/.../ffn_down.weight) in this GGUF file")
    return bits / numel, types
