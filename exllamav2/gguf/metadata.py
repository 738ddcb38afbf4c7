"""GGUF metadata → the dict an HF config.json would hold for the same model."""

from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf.gguf_reader import ReaderField

from .errors import GGUFError
from .rope_freqs import llama3_rope_scaling


@dataclass(frozen=True)
class ArchSpec:
    """How one GGUF architecture maps onto HF transformers."""
    hf_architecture: str
    model_type: str
    permuted_qk: bool      # llama.cpp permutes q/k rows for rotary embedding in interleaved form
    norm_offset: float     # llama.cpp stores (1 + w) for norms HF stores as w
    hidden_act_key: str
    hidden_act: str


# llama.cpp writes Mistral models as "llama"; they read as LlamaForCausalLM, as in HF's GGUF loader
# (which names them "mistral" only when general.name is exactly "mistral").
ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec("LlamaForCausalLM", "llama", True, 0.0, "hidden_act", "silu"),
    "qwen2": ArchSpec("Qwen2ForCausalLM", "qwen2", False, 0.0, "hidden_act", "silu"),
    "qwen3": ArchSpec("Qwen3ForCausalLM", "qwen3", False, 0.0, "hidden_act", "silu"),
    "gemma3": ArchSpec("Gemma3ForCausalLM", "gemma3_text", False, 1.0, "hidden_activation", "gelu_pytorch_tanh"),
}

# Values llama.cpp hard-codes for Gemma 3 rather than storing them in the file.
GEMMA3_SLIDING_WINDOW_PATTERN = 6
GEMMA3_LOCAL_ROPE_THETA = 10000.0
GEMMA3_27B_LAYERS = 62


def field_value(field: ReaderField) -> Any:
    """A scalar or small array field as Python values."""
    return field.contents()


class _Fields:
    def __init__(self, path: str, fields: dict[str, ReaderField]):
        self.path = path
        self.fields = fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self.fields.get(key)
        return default if field is None else field_value(field)

    def require(self, key: str) -> Any:
        if key not in self.fields:
            raise GGUFError(f"{self.path}: required GGUF metadata field '{key}' is missing")
        return field_value(self.fields[key])

    def uniform_int(self, key: str, default: Any = None) -> int | None:
        """An int field that some files store per layer; per-layer values must agree."""
        value = self.get(key, default)
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise GGUFError(f"{self.path}: '{key}' differs between layers ({value}); not supported")
            value = value[0]
        return None if value is None else int(value)


def architecture_spec(path: str, fields: dict[str, ReaderField]) -> tuple[str, ArchSpec]:
    """(GGUF architecture name, its ArchSpec); an unsupported architecture raises GGUFError."""
    f = _Fields(path, fields)
    arch = f.require("general.architecture")
    spec = ARCHITECTURES.get(arch)
    if spec is None:
        raise GGUFError(
            f"{path}: GGUF architecture '{arch}' is not supported (supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    return arch, spec


def _rope_scaling(f: _Fields, arch: str) -> dict | None:
    kind = f.get(f"{arch}.rope.scaling.type")
    factor = f.get(f"{arch}.rope.scaling.factor")
    if kind is None and f.get(f"{arch}.rope.scale_linear") is not None:
        kind, factor = "linear", f.get(f"{arch}.rope.scale_linear")
    if kind is None or kind == "none":
        return None
    scaling: dict[str, Any] = {"rope_type": kind}
    if factor is not None:
        scaling["factor"] = float(factor)
    optional = {
        "original_context_length": ("original_max_position_embeddings", int),
        "attn_factor": ("attention_factor", float),
        "yarn_beta_fast": ("beta_fast", float),
        "yarn_beta_slow": ("beta_slow", float),
    }
    for gguf_key, (hf_key, kind_of) in optional.items():
        value = f.get(f"{arch}.rope.scaling.{gguf_key}")
        if value is not None:
            scaling[hf_key] = kind_of(value)
    return scaling


def _gemma3_layer_types(f: _Fields, num_layers: int) -> list[str]:
    pattern = f.get("gemma3.attention.sliding_window_pattern", GEMMA3_SLIDING_WINDOW_PATTERN)
    if isinstance(pattern, list):
        # Per-layer booleans, true for sliding-window layers.
        if len(pattern) != num_layers:
            raise GGUFError(f"{f.path}: gemma3.attention.sliding_window_pattern has {len(pattern)} entries, "
                            f"expected {num_layers}")
        return ["sliding_attention" if p else "full_attention" for p in pattern]
    pattern = int(pattern)
    return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]


def build_hf_config(path: str, fields: dict[str, ReaderField], tensor_names: set[str],
                    rope_freqs: np.ndarray | None = None) -> dict:
    """The HF config.json dict for a GGUF file; `tensor_names` are the file's GGUF tensor names,
    `rope_freqs` the values of its rope_freqs.weight tensor if it has one."""
    f = _Fields(path, fields)
    arch, spec = architecture_spec(path, fields)

    hidden_size = int(f.require(f"{arch}.embedding_length"))
    num_layers = int(f.require(f"{arch}.block_count"))
    num_heads = f.uniform_int(f"{arch}.attention.head_count")
    if num_heads is None:
        raise GGUFError(f"{path}: required GGUF metadata field '{arch}.attention.head_count' is missing")
    num_kv_heads = f.uniform_int(f"{arch}.attention.head_count_kv", num_heads)

    head_dim = f.get(f"{arch}.attention.key_length")
    if head_dim is None and arch == "llama":
        head_dim = f.get(f"{arch}.rope.dimension_count")
    head_dim = int(head_dim) if head_dim is not None else hidden_size // num_heads

    vocab_size = f.get(f"{arch}.vocab_size")
    if vocab_size is None and "tokenizer.ggml.tokens" in fields:
        vocab_size = len(fields["tokenizer.ggml.tokens"].data)
    if vocab_size is None:
        raise GGUFError(f"{path}: no '{arch}.vocab_size' and no tokenizer.ggml.tokens to count the vocabulary")

    rope_theta = float(f.get(f"{arch}.rope.freq_base", 10000.0))
    rope_scaling = _rope_scaling(f, arch)
    if rope_freqs is not None and rope_scaling is None:
        rope_scaling = llama3_rope_scaling(path, rope_freqs, rope_theta, head_dim)

    cfg: dict[str, Any] = {
        "architectures": [spec.hf_architecture],
        "model_type": spec.model_type,
        "vocab_size": int(vocab_size),
        "hidden_size": hidden_size,
        "intermediate_size": f.uniform_int(f"{arch}.feed_forward_length"),
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        spec.hidden_act_key: spec.hidden_act,
        "rms_norm_eps": float(f.require(f"{arch}.attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(f.require(f"{arch}.context_length")),
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    for hf_key, gguf_key in (("bos_token_id", "bos"), ("eos_token_id", "eos"),
                             ("pad_token_id", "padding"), ("unk_token_id", "unknown")):
        token_id = f.get(f"tokenizer.ggml.{gguf_key}_token_id")
        if token_id is not None:
            cfg[hf_key] = int(token_id)
    if arch == "qwen2":
        cfg["attention_bias"] = "blk.0.attn_q.bias" in tensor_names

    full_rope = {"rope_type": "default", **(rope_scaling or {}), "rope_theta": rope_theta}
    if arch == "gemma3":
        local_theta = float(f.get("gemma3.rope.freq_base_swa", GEMMA3_LOCAL_ROPE_THETA))
        layer_types = _gemma3_layer_types(f, num_layers)
        # llama.cpp scales attention by 1/sqrt(hidden/heads) for the 27B model only, else 1/sqrt(head_dim).
        scalar = hidden_size // num_heads if num_layers == GEMMA3_27B_LAYERS else head_dim
        cfg.update({
            "sliding_window": f.uniform_int("gemma3.attention.sliding_window"),
            "layer_types": layer_types,
            "rope_local_base_freq": local_theta,
            "query_pre_attn_scalar": scalar,
            "final_logit_softcapping": f.get("gemma3.final_logit_softcapping"),
            "attn_logit_softcapping": f.get("gemma3.attn_logit_softcapping"),
            "attention_bias": False,
            "use_bidirectional_attention": False,
            "rope_parameters": {
                "sliding_attention": {"rope_type": "default", "rope_theta": local_theta},
                "full_attention": full_rope,
            },
        })
        if "full_attention" in layer_types and "sliding_attention" in layer_types:
            period = layer_types.index("full_attention") + 1
            if layer_types == ["sliding_attention" if (i + 1) % period else "full_attention" for i in range(num_layers)]:
                cfg["sliding_window_pattern"] = period
    else:
        cfg["rope_parameters"] = full_rope
    return cfg
