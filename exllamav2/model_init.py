"""Command-line model setup shared by scripts, as in the original's `exllamav2.model_init`:
`add_args(parser)` adds the usual flags, `check_args(args)` validates them, `init(args)` builds the
config with the overrides applied, loads the model and returns (model, tokenizer)."""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

from .config import ExLlamaV2Config, parse_dtype
from .model import ExLlamaV2
from .tokenizer import ExLlamaV2Tokenizer

TP_UNSUPPORTED = ("tensor parallelism (-tp) is not supported: this implementation runs the whole model on one "
                  "device (CPU or a single GPU); drop -tp, or use -gs to place layers")


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-m", "--model_dir", type=str, help="Model folder (config.json + *.safetensors), or a .gguf file")
    parser.add_argument("-gs", "--gpu_split", type=str, help="\"auto\", or memory per GPU in GB, comma-separated")
    parser.add_argument("-tp", "--tensor_parallel", action="store_true", help="Tensor parallel (not supported here)")
    parser.add_argument("-l", "--length", type=int, help="Maximum sequence length")
    parser.add_argument("-rs", "--rope_scale", type=float, help="RoPE scaling factor (linear: positions are divided by it)")
    parser.add_argument("-ra", "--rope_alpha", type=float, help="RoPE alpha value (NTK)")
    parser.add_argument("-ry", "--rope_yarn", type=float, help="YaRN RoPE scaling factor (over the model's native length)")
    parser.add_argument("-nfa", "--no_flash_attn", action="store_true", help="Disable flash attention")
    parser.add_argument("-nxf", "--no_xformers", action="store_true", help="Disable xformers")
    parser.add_argument("-nsdpa", "--no_sdpa", action="store_true", help="Disable torch SDPA")
    parser.add_argument("-ng", "--no_graphs", action="store_true", help="Disable graphs")
    parser.add_argument("-lm", "--low_mem", action="store_true", help="Smaller chunks and attention sizes, to save memory")
    parser.add_argument("-ept", "--experts_per_token", type=int, help="Override a MoE model's number of experts per token")
    parser.add_argument("-lq4", "--load_q4", action="store_true", help="Load weights in Q4 mode (accepted, has no effect here)")
    parser.add_argument("-ic", "--ignore_compatibility", action="store_true", help="Do not override options for architecture compatibility")
    parser.add_argument("-chunk", "--chunk_size", type=int, help="Largest chunk of input processed in one forward pass")
    parser.add_argument("--dtype", type=str, choices=["float32", "float16", "bfloat16"],
                        help="Activation/weight dtype (default: bfloat16 on the CPU, float16 on CUDA)")


def _opt(args, name: str, default=None):
    # init() also accepts namespaces built by parsers that define only some of the flags
    return getattr(args, name, default)


def print_options(args) -> None:
    print(f" -- Model: {_opt(args, 'model_dir')}")
    opts = []
    for name in ("gpu_split", "length", "rope_scale", "rope_alpha", "rope_yarn", "experts_per_token", "chunk_size", "dtype"):
        if _opt(args, name) is not None:
            opts.append(f"{name}: {_opt(args, name)}")
    for name in ("tensor_parallel", "no_flash_attn", "no_xformers", "no_sdpa", "no_graphs", "low_mem", "load_q4",
                 "ignore_compatibility"):
        if _opt(args, name):
            opts.append(name)
    print(f" -- Options: {opts}")


def model_dir_problem(model_dir: str | None) -> str | None:
    """Why `model_dir` cannot be loaded, or None when it looks loadable."""
    if not model_dir:
        return "no model given (-m / --model_dir)"
    if not os.path.exists(model_dir):
        return f"{model_dir}: no such file or folder"
    if os.path.isfile(model_dir):
        return None if model_dir.endswith(".gguf") else f"{model_dir}: a model file must be a .gguf file"
    if glob.glob(os.path.join(model_dir, "*.gguf")):
        return None
    for wanted in ("config.json", "*.safetensors", "tokenizer.json"):
        if not glob.glob(os.path.join(model_dir, wanted)):
            return f"{model_dir}: the model folder has no {wanted} (and no .gguf file)"
    return None


def parse_gpu_split(gpu_split: str | None) -> list[float] | None:
    """None or "auto" -> None; "20,24" -> [20.0, 24.0]."""
    if gpu_split is None or gpu_split == "auto":
        return None
    try:
        split = [float(x) for x in gpu_split.split(",")]
    except ValueError:
        raise ValueError(f"gpu_split '{gpu_split}': expected \"auto\" or GB per GPU, comma-separated (e.g. 20,24)") from None
    if any(x < 0 for x in split):
        raise ValueError(f"gpu_split '{gpu_split}': memory amounts must not be negative")
    return split


def check_args(args) -> None:
    """Exits with a message naming the problem when the arguments cannot work."""
    problems = []
    problem = model_dir_problem(_opt(args, "model_dir"))
    if problem:
        problems.append(problem)
    if _opt(args, "tensor_parallel"):
        problems.append(TP_UNSUPPORTED)
    try:
        parse_gpu_split(_opt(args, "gpu_split"))
    except ValueError as e:
        problems.append(str(e))
    for name in ("length", "chunk_size", "experts_per_token"):
        value = _opt(args, name)
        if value is not None and value <= 0:
            problems.append(f"{name} must be positive, got {value}")
    for name in ("rope_scale", "rope_alpha", "rope_yarn"):
        value = _opt(args, name)
        if value is not None and value <= 0:
            problems.append(f"{name} must be positive, got {value}")
    if problems:
        sys.exit(" ## Error: " + "\n ## Error: ".join(problems))


def _apply_yarn(config: ExLlamaV2Config, factor: float) -> None:
    """Switch full-attention RoPE to YaRN with `factor`, over the model's native length unless the
    model already declares YaRN with its own original length."""
    rp = dict(config.rope_parameters.get("full_attention", {}))
    if rp.get("rope_type") != "yarn" or not rp.get("original_max_position_embeddings"):
        rp["original_max_position_embeddings"] = config.native_max_seq_len
    rp["rope_type"] = "yarn"
    rp["factor"] = float(factor)
    config.rope_parameters = {**config.rope_parameters, "full_attention": rp}


def apply_overrides(config: ExLlamaV2Config, args, max_batch_size: int | None = None, max_input_len: int | None = None,
                    max_output_len: int | None = None, quiet: bool = False) -> None:
    """The command-line overrides, applied to a prepared config before the model is built."""
    if _opt(args, "tensor_parallel"):
        raise ValueError(TP_UNSUPPORTED)
    if _opt(args, "length"):
        config.max_seq_len = _opt(args, "length")
    if _opt(args, "rope_scale"):
        config.scale_pos_emb = _opt(args, "rope_scale")
    if _opt(args, "rope_alpha"):
        config.scale_alpha_value = _opt(args, "rope_alpha")
    if _opt(args, "rope_yarn"):
        _apply_yarn(config, _opt(args, "rope_yarn"))
    config.no_flash_attn = bool(_opt(args, "no_flash_attn") or config.no_flash_attn)
    config.no_xformers = bool(_opt(args, "no_xformers") or config.no_xformers)
    config.no_sdpa = bool(_opt(args, "no_sdpa") or config.no_sdpa)
    config.no_graphs = bool(_opt(args, "no_graphs") or config.no_graphs)
    if _opt(args, "experts_per_token"):
        if not getattr(config, "num_experts", None):
            raise ValueError(f"experts_per_token: {config.config_source} is not a mixture-of-experts model")
        if _opt(args, "experts_per_token") > config.num_experts:
            raise ValueError(f"experts_per_token {_opt(args, 'experts_per_token')}: the model has only {config.num_experts} experts")
        config.num_experts_per_token = _opt(args, "experts_per_token")
    if _opt(args, "dtype"):
        config.dtype = parse_dtype(_opt(args, "dtype"))

    if max_batch_size:
        config.max_batch_size = max_batch_size
    if max_input_len:
        config.max_input_len = max_input_len
    config.max_output_len = max_output_len

    if _opt(args, "low_mem"):
        config.set_low_mem()
    if _opt(args, "load_q4"):
        config.load_in_q4 = True
        if not quiet:
            print(" !! Warning: -lq4 (load_q4) has no effect in this implementation; weights load as stored")
    chunk = _opt(args, "chunk_size")
    if chunk:
        config.max_input_len = chunk
        config.max_attention_size = chunk ** 2
    if not _opt(args, "ignore_compatibility"):
        config.arch_compat_overrides(quiet=quiet)


def post_init_load(model: ExLlamaV2, args, allow_auto_split: bool = False, skip_load: bool = False,
                   benchmark: bool = False, progress: bool = False, quiet: bool = False) -> None:
    """Loads the model as -gs/-tp ask. With "-gs auto" the model stays unloaded (allow_auto_split must be
    set): the caller then makes a cache with lazy=True and calls model.load_autosplit(cache)."""
    if _opt(args, "tensor_parallel"):
        raise ValueError(TP_UNSUPPORTED)
    gpu_split = _opt(args, "gpu_split")
    if gpu_split == "auto":
        if not allow_auto_split:
            raise ValueError("gpu_split \"auto\" is not allowed by this script; give GB per GPU instead")
        return
    if skip_load:
        return
    split = parse_gpu_split(gpu_split)
    if not quiet:
        print(" -- Loading model...")
    start = time.perf_counter()
    model.load(split, progress=progress)
    if benchmark and not quiet:
        print(f" -- Loaded model in {time.perf_counter() - start:.4f} seconds")


def init(args, quiet: bool = False, allow_auto_split: bool = False, skip_load: bool = False, benchmark: bool = False,
         max_batch_size: int | None = None, max_input_len: int | None = None, max_output_len: int | None = None,
         progress: bool = False) -> tuple[ExLlamaV2, ExLlamaV2Tokenizer]:
    """Config with overrides -> model (loaded unless skip_load or "-gs auto") -> tokenizer."""
    problem = model_dir_problem(_opt(args, "model_dir"))
    if problem:
        raise FileNotFoundError(problem)
    config = ExLlamaV2Config(_opt(args, "model_dir"))
    apply_overrides(config, args, max_batch_size, max_input_len, max_output_len, quiet=quiet)
    model = ExLlamaV2(config)
    post_init_load(model, args, allow_auto_split=allow_auto_split, skip_load=skip_load, benchmark=benchmark,
                   progress=progress, quiet=quiet)
    if not quiet:
        print(" -- Loading tokenizer...")
    tokenizer = ExLlamaV2Tokenizer(config)
    return model, tokenizer
