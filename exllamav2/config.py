"""ExLlamaV2Config: a model folder's config.json (or a GGUF file's metadata) as typed fields, user options,
the architecture's ArchParams and the map from tensor name to the file that holds it."""

from __future__ import annotations

import glob
import json
import math
import numbers
import os

import torch

from .architecture import ExLlamaV2ArchParams
from .stloader import SafetensorsFile

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


class ConfigError(ValueError):
    pass


# sanity bounds of config fields, far above any real model: a value past them is a broken or hostile config
_MAX_SIZE = 1 << 24  # widths, heads, vocabulary
_MAX_LAYERS = 1 << 16
_MAX_POSITIONS = (1 << 31) - 1


def parse_dtype(value) -> torch.dtype | None:
    if value is None or isinstance(value, torch.dtype):
        return value
    try:
        return _DTYPES[str(value).lower().replace("torch.", "")]
    except KeyError:
        raise ConfigError(f"dtype '{value}' is not supported; use one of float32, float16, bfloat16") from None


class ExLlamaV2Config:
    """Construct with a model folder (config.json + *.safetensors), a .gguf file, or a folder holding one
    .gguf file. Options (max_seq_len, max_batch_size, max_input_len, dtype, scale_pos_emb, ...) may be
    changed after construction and before building the model."""

    def __init__(self, model_dir: str | None = None):
        self.model_dir = model_dir
        self.gguf_path: str | None = None
        self.gguf_file = None
        self.max_batch_size = 1
        self.max_input_len = 2048
        self.max_attention_size = 2048 ** 2
        self.max_output_len = None
        self.scale_pos_emb = 1.0
        self.scale_alpha_value = 1.0
        self.dtype: torch.dtype | None = None  # None: float16 on CUDA, bfloat16 on the CPU
        self.no_flash_attn = bool(os.environ.get("EXLLAMA_NO_FLASH_ATTN"))
        self.no_xformers = True
        self.no_sdpa = bool(os.environ.get("EXLLAMA_NO_SDPA"))
        self.no_graphs = True
        self.load_in_q4 = False
        self.tensor_file_map: dict = {}
        # GGUF Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/IQ4_NL/Q2_K/Q3_K/Q4_K/Q5_K/Q6_K/IQ4_XS linears stay in their blocks
        # (exllamav2/quant/gguf.py); True dequantises them to dense weights in `dtype` at load, as a plain
        # safetensors model would hold them
        self.gguf_dequantize = False
        self.checkpoint_offset_qzeros = False  # GPTQ "gptq_v2" checkpoints store zeros without the +1 offset
        self.residual_rotation: dict | None = None  # set by `convert --rotate`: hidden states are in rotated coordinates
        self.generation_config: dict = {}
        self.arch = None
        if model_dir is not None:
            self.prepare()

    # ---------------------------------------------------------------- reading

    def _locate(self) -> tuple[str, str | None]:
        """Returns (folder, gguf file or None)."""
        path = os.path.abspath(os.path.expanduser(str(self.model_dir)))
        if os.path.isfile(path):
            if path.lower().endswith(".gguf"):
                return os.path.dirname(path), path
            raise ConfigError(f"{path}: expected a model folder or a .gguf file")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"Model path not found: {path}")
        if os.path.exists(os.path.join(path, "config.json")):
            return path, None
        ggufs = sorted(glob.glob(os.path.join(path, "*.gguf")))
        if len(ggufs) == 1:
            return path, ggufs[0]
        if len(ggufs) > 1:
            raise ConfigError(f"{path}: no config.json and several .gguf files ({', '.join(map(os.path.basename, ggufs))}); pass one file")
        raise FileNotFoundError(f"{path}: no config.json (and no .gguf file) in the model folder")

    def prepare(self, no_tensors: bool = False) -> None:
        folder, gguf_path = self._locate()
        self.model_dir = folder
        self.gguf_path = gguf_path
        gguf_file = None
        if gguf_path is not None:
            from .gguf import GGUFFile
            gguf_file = GGUFFile(gguf_path)
            cfg = gguf_file.hf_config()
            self.config_source = gguf_path
        else:
            self.config_source = os.path.join(folder, "config.json")
            try:
                with open(self.config_source, encoding="utf8") as f:
                    cfg = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{self.config_source}: invalid JSON ({e})") from None
        gen_path = os.path.join(folder, "generation_config.json")
        if os.path.exists(gen_path):
            with open(gen_path, encoding="utf8") as f:
                self.generation_config = json.load(f)
        self.gguf_file = gguf_file   # the parsed header, which the tokenizer reads too
        self.read_config = cfg
        self._read_fields(cfg)
        if no_tensors:
            return
        if gguf_file is not None:
            self.tensor_file_map = {k: gguf_file for k in gguf_file.keys()}
        else:
            self._map_safetensors(folder)
        self._check_tensors()

    def _check_tensors(self) -> None:
        """The config against the tensors, before anything is built from it: the layers the config declares
        exist, and the embedding is hidden_size wide."""
        keys = self.arch.lm.keys
        prefix = keys["layers"] + "."
        present = set()
        for k in self.tensor_file_map:
            if k.startswith(prefix):
                idx = k[len(prefix):].split(".", 1)[0]
                if idx.isdigit():
                    present.add(int(idx))
        n = max(present) + 1 if present else 0
        if self.num_hidden_layers > n:
            held = f"layers 0..{n - 1}" if n else "no layers"
            raise ConfigError(f"{self.config_source}: field 'num_hidden_layers' is {self.num_hidden_layers} but the "
                              f"model's tensors hold {held} ('{prefix}N.*')")
        emb = keys["embed_tokens"] + ".weight"
        src = self.tensor_file_map.get(emb)
        if src is not None:
            try:
                shape = tuple(src.shape(emb))
            except Exception:  # a format that cannot tell the shape without reading: the loader checks it
                return
            if len(shape) == 2 and shape[1] != self.hidden_size:
                raise ConfigError(f"{self.config_source}: field 'hidden_size' is {self.hidden_size} but the embedding "
                                  f"'{emb}' has shape {list(shape)} (vocab x hidden)")

    def _get(self, cfg: dict, *keys, default=None, required=False, kind=None):
        text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else None
        for src in (cfg, text):
            if src is None:
                continue
            for k in keys:
                v = src
                for part in k.split("->"):
                    v = v.get(part) if isinstance(v, dict) else None
                if v is not None:
                    return v if kind is None else self._coerce(k, v, kind)
        if required:
            raise ConfigError(f"{self.config_source}: missing required field '{keys[0]}'")
        return default

    def _coerce(self, key: str, v, kind):
        """A field's value as `kind`, strictly: an int field takes an integer (or a float with an integral
        value), a float field a number; a string, a bool or a fraction is an error naming the file and field."""
        what = {int: "an integer", float: "a number"}.get(kind)
        if what is None:
            try:
                return kind(v)
            except (TypeError, ValueError):
                raise ConfigError(f"{self.config_source}: field '{key}' should be {kind.__name__}, got {v!r}") from None
        ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
        if ok and kind is int:
            ok = isinstance(v, numbers.Integral) or float(v).is_integer()
        if not ok:
            got = f"the string {v!r}" if isinstance(v, str) else f"{v!r} ({type(v).__name__})"
            raise ConfigError(f"{self.config_source}: field '{key}' should be {what}, got {got}")
        return int(v) if kind is int else float(v)

    def _read_fields(self, cfg: dict) -> None:
        archs = cfg.get("architectures")
        if not isinstance(archs, list) or len(archs) != 1:
            raise ConfigError(f"{self.config_source}: 'architectures' must list exactly one architecture, got {archs!r}")
        self.architecture = archs[0]
        self.arch = ExLlamaV2ArchParams(self.architecture, cfg, source=self.config_source)
        lm = self.arch.lm
        al = lm.config_aliases
        g = self._get

        def pos(name, value, most=_MAX_SIZE):
            if value is None or value <= 0 or value > most:
                raise ConfigError(f"{self.config_source}: field '{name}' must be an integer in 1..{most}, "
                                  f"got {value!r}")
            return value

        self.vocab_size = pos("vocab_size", g(cfg, *al.get("vocab_size", ["vocab_size"]), required=True, kind=int))
        self.hidden_size = pos("hidden_size", g(cfg, *al.get("hidden_size", ["hidden_size", "d_model", "n_embd"]), required=True, kind=int))
        self.num_hidden_layers = pos("num_hidden_layers", g(cfg, *al.get("num_hidden_layers", ["num_hidden_layers", "n_layers", "n_layer"]), required=True, kind=int), _MAX_LAYERS)
        self.num_attention_heads = pos("num_attention_heads", g(cfg, *al.get("num_attention_heads", ["num_attention_heads", "n_heads", "n_head"]), required=True, kind=int))
        self.head_dim = g(cfg, *al.get("head_dim", ["head_dim"]), kind=int)
        if self.head_dim is not None:
            pos("head_dim", self.head_dim)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(f"{self.config_source}: hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if lm.mqa:
            self.num_key_value_heads = 1
        else:
            self.num_key_value_heads = pos("num_key_value_heads", g(cfg, *al.get("num_key_value_heads", ["num_key_value_heads", "attn_config->kv_n_heads"]), default=self.num_attention_heads, kind=int))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{self.config_source}: num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads {self.num_key_value_heads}")
        self.num_key_value_groups = self.num_attention_heads // self.num_key_value_heads
        self.intermediate_size = g(cfg, *al.get("intermediate_size", ["intermediate_size", "n_inner", "ffn_config->ffn_hidden_size"]), kind=int)
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        pos("intermediate_size", self.intermediate_size)
        self.norm_eps = g(cfg, *al.get("norm_eps", [lm.keys["norm_eps"], "rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_eps"]), default=1e-5, kind=float)
        self.hidden_act = g(cfg, "hidden_act", "hidden_activation", "activation_function")

        # special tokens
        self.bos_token_id = g(cfg, "bos_token_id", kind=None)
        eos = g(cfg, "eos_token_id")
        self.eos_token_id = eos[0] if isinstance(eos, list) and eos else eos
        self.pad_token_id = g(cfg, "pad_token_id")
        self.tie_word_embeddings = bool(g(cfg, "tie_word_embeddings", default=False))

        # scaling and caps
        self.logit_scale = float(g(cfg, "logit_scale", default=1.0))
        if g(cfg, "logits_scaling") is not None:
            self.logit_scale = 1.0 / float(g(cfg, "logits_scaling"))
        self.scale_emb = float(g(cfg, "scale_emb", "embedding_multiplier", default=1.0))
        self.scale_depth = float(g(cfg, "residual_multiplier", default=1.0))
        self.attention_multiplier = g(cfg, "attention_multiplier", kind=float)
        self.query_pre_attn_scalar = g(cfg, "query_pre_attn_scalar", kind=float)
        # a family may list no keys for a field its HF model ignores (Gemma 3 never applies attention softcap)
        self.attn_logit_softcapping = g(cfg, *al.get("attn_logit_softcapping", ["attn_logit_softcapping"]), kind=float)
        # (and Gemma3ForConditionalGeneration never applies the text config's final softcap)
        self.final_logit_softcapping = g(cfg, *al.get("final_logit_softcapping", ["final_logit_softcapping"]), kind=float)
        self.use_qk_norm = bool(g(cfg, "use_qk_norm", default=lm.use_qk_norm))

        # MoE
        self.num_experts = g(cfg, "num_local_experts", "num_experts", "ffn_config->moe_num_experts", kind=int)
        self.num_experts_per_token = g(cfg, "num_experts_per_tok", "num_experts_per_token", "ffn_config->moe_top_k", kind=int)

        # positions
        self.max_seq_len = pos("max_position_embeddings", g(cfg, "max_sequence_length", "model_max_length", "max_position_embeddings", "max_seq_len", "n_positions", default=2048, kind=int), _MAX_POSITIONS)
        self.native_max_seq_len = self.max_seq_len
        prf = g(cfg, "partial_rotary_factor", "rotary_pct", "rope_parameters->partial_rotary_factor", kind=float)
        rotary_dim = g(cfg, "rotary_dim", kind=int)
        if prf is None and rotary_dim is not None:
            prf = rotary_dim / self.head_dim
        self.partial_rotary_factor = 1.0 if prf is None else prf
        self.rope_parameters = self._read_rope(cfg)
        self.rotary_embedding_base = self.rope_parameters["full_attention"]["rope_theta"]
        self.sliding_window = g(cfg, "sliding_window", "sliding_window_size", kind=int) or 0
        self.layer_types = self._read_layer_types(cfg)

    def _read_rope(self, cfg: dict) -> dict:
        """Normalise the old (rope_theta + rope_scaling) and new (rope_parameters, possibly per layer type)
        config forms to {layer_type: {rope_type, rope_theta, ...}}."""
        text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
        rp = cfg.get("rope_parameters", text.get("rope_parameters"))
        theta = self._get(cfg, "rope_theta", "rotary_emb_base", "rope_embedding_base", "attn_config->rope_theta", kind=float)
        scaling = cfg.get("rope_scaling", text.get("rope_scaling"))
        out = {}
        if isinstance(rp, dict) and rp and all(isinstance(v, dict) for v in rp.values()):
            out = {k: dict(v) for k, v in rp.items()}
        elif isinstance(rp, dict) and rp:
            out = {"full_attention": dict(rp)}
        else:
            d = dict(scaling) if isinstance(scaling, dict) else {}
            out = {"full_attention": d}
        full = out.setdefault("full_attention", {})
        full.setdefault("rope_theta", theta if theta is not None else 10000.0)
        local_theta = self._get(cfg, "rope_local_base_freq", kind=float)
        if "sliding_attention" not in out and (local_theta is not None or self.arch.lm.sliding_rope_theta is not None):
            out["sliding_attention"] = {"rope_type": "default",
                                        "rope_theta": local_theta if local_theta is not None else self.arch.lm.sliding_rope_theta}
        for k, v in out.items():
            t = v.get("rope_type", v.get("type", "default"))
            v["rope_type"] = "longrope" if t == "su" else t
            v.setdefault("rope_theta", full["rope_theta"])
            if "rope_theta" in v:
                v["rope_theta"] = float(v["rope_theta"])
        return out

    def _read_layer_types(self, cfg: dict) -> list[str]:
        n = self.num_hidden_layers
        lt = self._get(cfg, "layer_types")
        if isinstance(lt, list):
            if len(lt) < n:
                raise ConfigError(f"{self.config_source}: 'layer_types' has {len(lt)} entries, expected {n}")
            return [("sliding_attention" if (t == "sliding_attention" and self.sliding_window) else "full_attention") for t in lt[:n]]
        lm = self.arch.lm
        if lm.alternating_swa and self.sliding_window:
            pattern = self._get(cfg, "sliding_window_pattern", "_sliding_window_pattern", kind=int) or 2
            return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]
        if lm.swa and self.sliding_window:
            # Qwen2-style configs keep full attention below max_window_layers (HF builds layer_types this way)
            first = self._get(cfg, "max_window_layers", kind=int) or 0
            return ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
        return ["full_attention"] * n

    def _map_safetensors(self, folder: str) -> None:
        files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
        if not files:
            raise FileNotFoundError(f"{folder}: no *.safetensors files in the model folder")
        self.tensor_file_map = {}
        for path in files:
            st = SafetensorsFile(path, self.arch.keymap)
            for k in st.keys():
                self.tensor_file_map[k] = st
        qc = self.read_config.get("quantization_config") or {}
        self.checkpoint_offset_qzeros = qc.get("checkpoint_format") == "gptq_v2"
        self.residual_rotation = qc.get("residual_rotation") or None

    # ---------------------------------------------------------------- options

    def arch_compat_overrides(self, quiet: bool = False, warn_only: bool = False) -> None:
        """Kept for API compatibility: every attention path here supports softcap and sliding windows."""

    def set_low_mem(self) -> None:
        self.max_input_len = 1024
        self.max_attention_size = 1024 ** 2
        self.max_output_len = 1024 if self.max_output_len is None else min(self.max_output_len, 1024)

    def resolved_dtype(self, device: str) -> torch.dtype:
        dt = parse_dtype(self.dtype)
        if dt is not None:
            return dt
        return torch.float16 if str(device).startswith("cuda") else torch.bfloat16

    @property
    def rotary_dim(self) -> int:
        rd = int(self.head_dim * self.partial_rotary_factor)
        return rd - rd % 2

    def attn_scale(self) -> float:
        if self.attention_multiplier is not None:
            return self.attention_multiplier
        if self.query_pre_attn_scalar is not None:
            return self.query_pre_attn_scalar ** -0.5
        return 1.0 / math.sqrt(self.head_dim)
