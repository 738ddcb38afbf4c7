"""Architecture parameters and the registry that maps an `architectures[0]` string to them.

Each family declares its `ArchParams` as data in `exllamav2/architectures/<family>.py`. An optional
`configure(params, cfg)` hook adjusts the copy for one model's config.json (e.g. GPT-NeoX's
`use_parallel_residual`). A family that llama.cpp writes as GGUF also declares a `GGUFArch` there: the GGUF
`general.architecture` it serves, the HF architecture it reads as, its block tensor names and its metadata ->
config.json facts. The registry finds the family modules itself (every module of `exllamav2.architectures`
except the helpers listed there), so adding a family is one new file. Unknown architectures are refused,
never loaded as Llama.
"""

from __future__ import annotations

import copy
import importlib
import pkgutil
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Callable


class RopeStyle(IntEnum):
    NONE = 0  # no rotary embedding (learned or no positional embedding)
    GPTJ = 1  # rotate interleaved pairs (2i, 2i+1)
    NEOX = 2  # rotate halves (i, i + rot_dim/2)


def default_keys() -> dict:
    return {
        "norm_eps": "rms_norm_eps",
        "embed_tokens": "model.embed_tokens",
        "learned_pos_emb": None,
        "layers": "model.layers",
        "norm": "model.norm",
        "lm_head": "lm_head",
        "norm_1": ".input_layernorm",
        "norm_1_post": None,
        "norm_2": ".post_attention_layernorm",
        "norm_2_post": None,
        "attn_q": ".self_attn.q_proj",
        "attn_k": ".self_attn.k_proj",
        "attn_v": ".self_attn.v_proj",
        "attn_o": ".self_attn.o_proj",
        "attn_q_norm": ".self_attn.q_norm",
        "attn_k_norm": ".self_attn.k_norm",
        "fused_qkv": None,
        "mlp_gate": ".mlp.gate_proj",
        "mlp_up": ".mlp.up_proj",
        "mlp_down": ".mlp.down_proj",
        "fused_mlp_12": None,
        "mlp_expert_gate": None,
    }


@dataclass
class ArchParams:
    """What differs between model families. Field names follow the original's `Params`."""

    arch_string: str = ""
    family: str = ""
    keys: dict = field(default_factory=default_keys)
    # tensor-name substitutions applied to every name read from a file: (find, replace);
    # a `find` starting with "$" is anchored at the start of the name
    keymap: list = field(default_factory=list)
    orig_weights_transposed: bool = False  # GPT-2 Conv1D: linears inside decoder layers are stored (in, out)

    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm"
    norm_bias: bool = False  # layernorm with bias
    norm_constant_bias: float = 0.0  # added to norm weights at load (Gemma: 1 + w)
    headnorm: str = "rmsnorm"  # q/k norm kind
    headnorm_per_head: bool = False  # q/k norm weight is (heads, head_dim) (Cohere)
    qk_norm_before_reshape: bool = False  # q/k norm over the whole projection (OLMo 2)

    mlp_gate: bool = True
    mlp_act_func: str = "silu"  # silu | gelu | gelu_tanh | relu | quickgelu
    mlp_bias: bool = False
    is_moe: bool = False
    moe_dense_layers: tuple = ()  # layers of an MoE model with a dense MLP (decoder_sparse_step, mlp_only_layers)
    moe_norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum to 1

    attention_bias_qkv: bool = False
    attention_bias_o: bool = False
    rope_style: RopeStyle = RopeStyle.NEOX
    nope_full_attention: bool = False  # full-attention layers use no RoPE, only sliding ones do (Cohere2)
    parallel_decoder_blocks: bool = False
    mqa: bool = False
    fused_qkv_altpack: bool = False  # per-KV-head [q.., k, v] row blocks; MHA gives GPT-NeoX's per-head [q, k, v]

    normalize_embeddings: bool = False  # multiply embeddings by sqrt(hidden)
    residual_stream_fp32: bool = False
    requires_bos: bool = False
    swa: bool = False  # honour config.sliding_window on every layer
    alternating_swa: bool = False  # sliding window on some layers only (see config.layer_types)
    sliding_rope_theta: float | None = None
    sliding_rope_scale: float | None = None
    head_bias: bool = False  # lm_head has a bias (GPT-J, Phi)
    use_qk_norm: bool = False
    supports_tp: bool = False

    # config.json key aliases read for this family: field -> list of keys (first found wins)
    config_aliases: dict = field(default_factory=dict)

    def clone(self) -> "ArchParams":
        return copy.deepcopy(self)


@dataclass
class ArchEntry:
    params: ArchParams
    configure: Callable[[ArchParams, dict], None] | None = None
    notes: str = ""


_REGISTRY: dict[str, ArchEntry] = {}


def register(arch_string: str, params: ArchParams, configure=None, notes: str = "") -> None:
    p = params.clone()
    p.arch_string = arch_string
    _REGISTRY[arch_string] = ArchEntry(p, configure, notes)


@dataclass(frozen=True)
class GGUFArch:
    """How one GGUF `general.architecture` maps onto HF transformers; declared by the family that serves it.

    `block_names` maps llama.cpp's per-block tensor names (`blk.N.<name>.weight`) to HF's (`model.layers.N.
    <name>.weight`); `top_names` the names outside the blocks. `config(meta, cfg)` adds the family's own
    config.json fields from the file's metadata; `meta` is the generic reader's view of the file (`get`,
    `require`, `uniform_int`, `error`, `arch`, `path`, `tensor_names`, `full_rope`, see gguf/metadata.py)."""

    name: str                   # GGUF general.architecture
    hf_architecture: str        # the architectures[0] string it reads as (registered by the same family)
    model_type: str
    block_names: dict
    top_names: dict | None = None   # None: the common token_embd / output_norm / output names
    permuted_qk: bool = False   # llama.cpp permutes q/k rows for rotary embedding in interleaved form
    norm_offset: float = 0.0    # llama.cpp stores (1 + w) for norms HF stores as w
    hidden_act_key: str = "hidden_act"
    hidden_act: str = "silu"
    head_dim_from_rope: bool = False  # no attention.key_length: head_dim is rope.dimension_count (llama)
    config: Callable[[Any, dict], None] | None = None
    # serves the files with experts (`<name>.expert_count` > 0; llama.cpp writes Mixtral as "llama"): a name may have
    # one spec without and one with; block names with `*` for the expert index are 3-D tensors (gguf/experts.py)
    moe: bool = False
    one_row_matrices: frozenset = frozenset()  # block names HF holds as (1, n) that llama.cpp stores as n-vectors


_GGUF_REGISTRY: dict[str, GGUFArch] = {}      # files without experts (or a name's only spec)
_GGUF_MOE_REGISTRY: dict[str, GGUFArch] = {}  # files with experts


def register_gguf(spec: GGUFArch) -> None:
    (_GGUF_MOE_REGISTRY if spec.moe else _GGUF_REGISTRY)[spec.name] = spec


def gguf_architectures() -> dict[str, GGUFArch]:
    """{GGUF general.architecture: GGUFArch} for every family that declares one, sorted by name; where a name has a
    spec for files with experts and one without, the one without (`gguf_architecture` picks per file)."""
    _load_families()
    return dict(sorted({**_GGUF_MOE_REGISTRY, **_GGUF_REGISTRY}.items()))


def gguf_architecture(name: str, experts: bool) -> GGUFArch | None:
    """The GGUFArch for a file of GGUF architecture `name` with experts or without, or None. A name served only
    with experts gets that spec either way: its `config` hook then asks for the missing expert count."""
    _load_families()
    if experts:
        return _GGUF_MOE_REGISTRY.get(name)
    return _GGUF_REGISTRY.get(name) or _GGUF_MOE_REGISTRY.get(name)


def _load_families() -> None:
    """Import every family module of `exllamav2.architectures`; importing one registers its families. The
    folder is listed on each call (cheap; modules already imported are not re-run), so a module added to
    the package path is picked up without editing any list."""
    from . import architectures
    for info in pkgutil.iter_modules(architectures.__path__):
        if info.name.startswith("_") or info.name in architectures.HELPER_MODULES:
            continue
        importlib.import_module(f"{architectures.__name__}.{info.name}")


def supported_architectures() -> dict[str, ArchEntry]:
    _load_families()
    return dict(sorted(_REGISTRY.items()))


class UnsupportedArchitectureError(ValueError):
    pass


class ExLlamaV2ArchParams:
    """`config.arch`: the language model's params in `.lm` (vision parts are not supported)."""

    def __init__(self, arch_string: str, read_config: dict, source: str = "config.json"):
        _load_families()
        entry = _REGISTRY.get(arch_string)
        if entry is None:
            names = ", ".join(sorted(_REGISTRY))
            raise UnsupportedArchitectureError(
                f"{source}: architecture '{arch_string}' is not supported. Supported architectures: {names}"
            )
        self.arch_string = arch_string
        self.lm = entry.params.clone()
        self.lm_prefix = ""
        self.notes = entry.notes
        if entry.configure is not None:
            entry.configure(self.lm, read_config)
        # global overrides from config.json, as the original applies them
        if read_config.get("attention_bias") and not (self.lm.attention_bias_qkv or self.lm.attention_bias_o):
            self.lm.attention_bias_qkv = True
            self.lm.attention_bias_o = True
        if read_config.get("mlp_bias"):
            self.lm.mlp_bias = True

    @property
    def keymap(self):
        return self.lm.keymap
