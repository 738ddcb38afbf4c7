"""GGUF metadata → the dict an HF config.json would hold for the same model.

The generic part lives here (sizes, heads, rope, special tokens); what is particular to a family (which HF
architecture a GGUF architecture reads as, llama.cpp's conventions for it, extra config.json fields such as
Gemma 3's layer types) is declared by the family in its file under exllamav2/architectures/ (GGUFArch)."""

from typing import Any

import numpy as np

from ..architecture import GGUFArch, gguf_architecture, gguf_architectures
from .errors import GGUFError
from .header import GGUFField
from .rope_freqs import llama3_rope_scaling


# How one GGUF architecture maps onto HF transformers: declared by its family under exllamav2/architectures/.
ArchSpec = GGUFArch


def field_value(field: GGUFField) -> Any:
    """A scalar or small array field as Python values."""
    return field.contents()


class GGUFMeta:
    """A GGUF file's metadata as the config builder and the families' `GGUFArch.config` hooks read it:
    `arch` (general.architecture), `tensor_names` (the file's GGUF tensor names) and, once the generic
    fields are built, `full_rope` (the full-attention rope parameters)."""

    def __init__(self, path: str, fields: dict[str, GGUFField], tensor_names: set[str] | None = None):
        self.path = path
        self.fields = fields
        self.arch: str | None = None
        self.tensor_names = set(tensor_names or ())
        self.full_rope: dict | None = None

    def error(self, message: str) -> GGUFError:
        """A GGUFError naming the file (raise it)."""
        return GGUFError(f"{self.path}: {message}")

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


def architecture_spec(path: str, fields: dict[str, GGUFField]) -> tuple[str, GGUFArch]:
    """(GGUF architecture name, its GGUFArch); an unsupported architecture raises GGUFError."""
    f = GGUFMeta(path, fields)
    arch = f.require("general.architecture")
    archs = gguf_architectures()
    experts = f.uniform_int(f"{arch}.expert_count", 0) if arch in archs else 0
    spec = gguf_architecture(arch, experts > 0)
    if spec is None and arch in archs:
        raise GGUFError(f"{path}: GGUF architecture '{arch}' with experts ('{arch}.expert_count' = {experts}) is not "
                        f"supported; it is supported without experts")
    if spec is None:
        raise GGUFError(f"{path}: GGUF architecture '{arch}' is not supported (supported: {', '.join(archs)})")
    return arch, spec


def _rope_scaling(f: GGUFMeta, arch: str) -> dict | None:
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


def build_hf_config(path: str, fields: dict[str, GGUFField], tensor_names: set[str],
                    rope_freqs: np.ndarray | None = None) -> dict:
    """The HF config.json dict for a GGUF file; `tensor_names` are the file's GGUF tensor names,
    `rope_freqs` the values of its rope_freqs.weight tensor if it has one."""
    f = GGUFMeta(path, fields, tensor_names)
    arch, spec = architecture_spec(path, fields)
    f.arch = arch

    hidden_size = int(f.require(f"{arch}.embedding_length"))
    num_layers = int(f.require(f"{arch}.block_count"))
    num_heads = f.uniform_int(f"{arch}.attention.head_count")
    if num_heads is None:
        raise GGUFError(f"{path}: required GGUF metadata field '{arch}.attention.head_count' is missing")
    num_kv_heads = f.uniform_int(f"{arch}.attention.head_count_kv", num_heads)

    head_dim = f.get(f"{arch}.attention.key_length")
    if head_dim is None and spec.head_dim_from_rope:
        head_dim = f.get(f"{arch}.rope.dimension_count")
    head_dim = int(head_dim) if head_dim is not None else hidden_size // num_heads
    rotary = f.get(f"{arch}.rope.dimension_count")
    if rotary is not None and int(rotary) != head_dim:
        # every family read from GGUF here rotates whole heads; llama.cpp refuses these files too ("invalid n_rot")
        raise GGUFError(f"{path}: {arch}.rope.dimension_count {int(rotary)} is not the head width {head_dim}: "
                        f"partial rotary embeddings are not supported in '{arch}' GGUF files")

    vocab_size = f.get(f"{arch}.vocab_size")
    if vocab_size is None and "tokenizer.ggml.tokens" in fields:
        vocab_size = len(fields["tokenizer.ggml.tokens"].value)
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
    f.full_rope = {"rope_type": "default", **(rope_scaling or {}), "rope_theta": rope_theta}
    if spec.config is not None:
        spec.config(f, cfg)  # the family's own fields (e.g. Gemma 3's layer types and per-type rope)
    cfg.setdefault("rope_parameters", f.full_rope)
    return cfg
