"""Randomized GGUF fuzz: tiny random HF models of the GGUF families we read, written as F16 GGUF, requantized with
llama.cpp's llama-quantize (or the `gguf` library's own quantizers), then checked for silent wrong answers.

    python bench/fuzz_gguf.py --seed 0 --cases 8 [--arch llama,qwen2,...] [--types Q4_0,Q4_K_M,...]

Per case (one line each; a mismatch prints a report and the exit code is 1):
  oracle   our fp32 logits (prefill + 12 cached decode steps, teacher forced) against HF transformers running the
           file's weights: the HF model class with every tensor dequantised by gguf-py straight from the file (the
           names and layout undone by this script's own tables, not our loader's), and also HF's own GGUF loader
           (`from_pretrained(gguf_file=...)`) where it takes the family. Relative to the logits' span: 1e-4.
  kernels  the default backend (the C++ kernels over the file's blocks) against the `torch` backend (dequantised),
           in bf16 and fp16, both against the fp32 oracle: the kernel path's error may not exceed the torch path's
           by more than the int8-activation error (see tests/test_cpu_kernels.py: relative 1e-2 in norm per linear).
  batch    three left-padded prompts of different lengths in one batch (prefill + 12 greedy steps) against each alone,
           fp32: logits within 1e-4 of the span, same greedy tokens unless the top two are within that.
  dynamic  ExLlamaV2DynamicGenerator's greedy tokens against the model.forward + argmax loop (fp32 and bf16).
Types llama-quantize is absent for fall back to the gguf library's quantizers where it has one (Q4_0, Q4_1, Q5_0,
Q5_1, Q8_0, IQ4_NL... see gguf.quants), else the case is skipped with a message.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import zlib

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
LLAMA_QUANTIZE = os.environ.get("LLAMA_QUANTIZE", os.path.expanduser("~/.cache/exllamav2/llama.cpp/bin/llama-quantize"))
ARCHS = ("llama", "qwen2", "qwen3", "gemma3", "mixtral", "qwen2moe", "qwen3moe")
TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K",
         "IQ4_NL", "IQ4_XS", "MIX")
# the file types llama-quantize names by a single tensor type (--pure gives every big matrix that type)
EXTRA_TYPES = ("F16", "BF16", "F32", "TQ1_0", "TQ2_0", "MXFP4_MOE", "Q2_K_S", "Q3_K_L", "Q5_K_S")   # --types only
PURE_OK = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q6_K", "IQ4_NL", "IQ4_XS", "Q3_K_S", "Q4_K_S"}
# without llama-quantize: the gguf library quantizes these ...
GGUF_PY_QUANTIZE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0", "BF16", "MXFP4")
# ... and these are random valid blocks (tests/test_gguf_support.random_kquant_blocks: random codes, realistic
# scales; the oracle reads whatever the file holds, so the HF model's own values do not matter)
RANDOM_BLOCK_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ4_NL")
GGUF_PY_TYPES = GGUF_PY_QUANTIZE + RANDOM_BLOCK_TYPES

TOL_ORACLE = 1e-4       # fp32, relative to the logits' span
TOL_BATCH = 1e-4


# ------------------------------------------------------------------------------------------------ random models

def random_config(arch: str, rng: np.random.Generator):
    import transformers as tf
    # widths of 256k (every K-quant applies) and SmolLM2-like ones (576, 320: llama-quantize falls back per tensor)
    hidden = int(rng.choice([256, 512, 256, 512, 576, 320]))
    head_dim = int(rng.choice([64, 128] + ([256] if arch == "gemma3" else [])))
    heads = int(rng.choice([h for h in (2, 3, 4, 5, 8, 9) if h * head_dim <= 2 * hidden and hidden % h == 0]))
    kv = int(rng.choice([k for k in (1, 2, 3, 4, 8, 9) if heads % k == 0 and k <= heads]))
    ffn = int(rng.choice([512, 768, 1024, 1536, 640]))
    vocab = int(1000 + 2 * rng.integers(0, 400) + 1)          # odd
    tied = bool(rng.random() < 0.5)
    layers = 2
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, max_position_embeddings=512,
                  rms_norm_eps=float(rng.choice([1e-5, 1e-6])), tie_word_embeddings=tied, bos_token_id=1,
                  eos_token_id=2)
    theta = float(rng.choice([10000.0, 500000.0, 1000000.0]))
    rope = {"rope_type": "default", "rope_theta": theta}
    if arch == "llama":
        return tf.LlamaForCausalLM, tf.LlamaConfig(**common, rope_parameters=rope)
    if arch == "qwen2":
        return tf.Qwen2ForCausalLM, tf.Qwen2Config(**common, rope_parameters=rope)
    if arch == "qwen3":
        return tf.Qwen3ForCausalLM, tf.Qwen3Config(**common, rope_parameters=rope)
    if arch == "gemma3":
        layers = int(rng.choice([2, 7]))
        types = ["sliding_attention" if (i + 1) % 6 else "full_attention" for i in range(layers)]
        cfg = tf.Gemma3TextConfig(**{**common, "num_hidden_layers": layers}, query_pre_attn_scalar=head_dim,
                                  sliding_window=int(rng.choice([8, 16, 512])), layer_types=types,
                                  hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=None,
                                  attn_logit_softcapping=None,
                                  rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                   "full_attention": rope})
        return tf.Gemma3ForCausalLM, cfg
    moe = dict(num_experts_per_tok=int(rng.choice([1, 2])))
    if arch == "mixtral":
        return tf.MixtralForCausalLM, tf.MixtralConfig(**{**common, "tie_word_embeddings": False, "intermediate_size": 256},
                                                       num_local_experts=4, rope_parameters=rope, **moe)
    if arch == "qwen2moe":
        return tf.Qwen2MoeForCausalLM, tf.Qwen2MoeConfig(**{**common, "tie_word_embeddings": False},
                                                         num_experts=4, moe_intermediate_size=256,
                                                         shared_expert_intermediate_size=512, norm_topk_prob=False,
                                                         rope_parameters=rope, **moe)
    if arch == "qwen3moe":
        return tf.Qwen3MoeForCausalLM, tf.Qwen3MoeConfig(**{**common, "tie_word_embeddings": False},
                                                         num_experts=4, moe_intermediate_size=256, norm_topk_prob=True,
                                                         rope_parameters=rope, **moe)
    raise ValueError(arch)


def random_model(arch: str, seed: int):
    rng = np.random.default_rng(seed)
    cls, cfg = random_config(arch, rng)
    torch.manual_seed(seed)
    cfg._attn_implementation = "eager"
    m = cls(cfg).float().eval()
    scale = 0.04 if cfg.hidden_size == 512 else 0.06
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, scale)
            elif "norm" in name:
                p.normal_(0.0 if arch == "gemma3" else 1.0, 0.1)
            else:
                p.normal_(0.0, 0.05)
    return m


# ------------------------------------------------------------------------------------------------ F16 writer

GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3", "mixtral": "llama",
             "qwen2moe": "qwen2moe", "qwen3moe": "qwen3moe"}
# HF block names → llama.cpp's, this script's own table (independent of exllamav2/architectures/)
BLOCK = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
         "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
         "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "post_attention_layernorm": "ffn_norm",
         "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate": "ffn_gate_inp",
         "mlp.shared_expert.gate_proj": "ffn_gate_shexp", "mlp.shared_expert.up_proj": "ffn_up_shexp",
         "mlp.shared_expert.down_proj": "ffn_down_shexp", "mlp.shared_expert_gate": "ffn_gate_inp_shexp"}
GEMMA3_BLOCK = {**BLOCK, "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                "post_feedforward_layernorm": "post_ffw_norm"}
TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute (q/k rows for interleaved rotary)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(hf, kind: str) -> dict[str, np.ndarray]:
    """{GGUF name: fp32 values in llama.cpp's layout}."""
    cfg = hf.config
    sd = {k: v.detach().float().numpy() for k, v in hf.state_dict().items()}
    table = GEMMA3_BLOCK if kind == "gemma3" else BLOCK
    out = {}
    for name, v in sd.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            if ".experts." in rest:
                if rest.endswith("gate_up_proj"):
                    half = v.shape[1] // 2
                    out[f"blk.{i}.ffn_gate_exps.weight"], out[f"blk.{i}.ffn_up_exps.weight"] = v[:, :half], v[:, half:]
                else:
                    out[f"blk.{i}.ffn_down_exps.weight"] = v
                continue
            part, suffix = rest.rsplit(".", 1)
            g = f"blk.{i}.{table[part]}.{suffix}"
        else:
            part, suffix = name.rsplit(".", 1)
            g = f"{TOP[part]}.{suffix}"
        if GGUF_ARCH[kind] == "llama" and g.endswith("attn_q.weight"):
            v = permute(v, cfg.num_attention_heads)
        elif GGUF_ARCH[kind] == "llama" and g.endswith("attn_k.weight"):
            v = permute(v, cfg.num_key_value_heads)
        if kind == "gemma3" and "norm" in g:
            v = v + 1.0
        if g.endswith("ffn_gate_inp_shexp.weight"):
            v = v.reshape(-1)
        out[g] = np.ascontiguousarray(v)
    return out


def write_f16_gguf(hf, kind: str, path: str, qtype: str = "F16") -> str:
    """The model as llama.cpp's converter writes it: matrices F16 (or `qtype` through gguf-py's quantizer; the router
    stays F32 as llama.cpp keeps it), 1-D tensors F32."""
    import gguf
    cfg = hf.config
    arch = GGUF_ARCH[kind]
    w = gguf.GGUFWriter(path, arch)
    w.add_name(f"fuzz-{kind}")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    rope = cfg.rope_parameters.get("full_attention", cfg.rope_parameters)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    if arch == "llama":
        w.add_rope_dimension_count(cfg.head_dim)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    if kind == "mixtral":
        w.add_feed_forward_length(cfg.intermediate_size)
    elif kind in ("qwen2moe", "qwen3moe"):
        w.add_feed_forward_length(cfg.intermediate_size)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if kind == "qwen2moe":
            w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    else:
        w.add_feed_forward_length(cfg.intermediate_size)
    if kind in ("mixtral", "qwen2moe", "qwen3moe"):
        w.add_expert_count(cfg.num_local_experts if kind == "mixtral" else cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
    if kind == "gemma3":
        w.add_sliding_window(cfg.sliding_window)
    add_spm_vocab(w, cfg.vocab_size, seed=cfg.vocab_size)
    for name, v in gguf_tensors(hf, kind).items():
        if v.ndim == 1 or name.endswith("ffn_gate_inp.weight"):
            w.add_tensor(name, v.astype(np.float32))
        elif qtype == "F16":
            w.add_tensor(name, v.astype(np.float16))
        elif qtype in RANDOM_BLOCK_TYPES and v.shape[-1] % 256 and qtype != "IQ4_NL":
            # K-quant super-blocks need rows of 256k weights; llama-quantize falls back for such a tensor too
            w.add_tensor(name, gguf.quants.quantize(v.astype(np.float32), gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        elif qtype in RANDOM_BLOCK_TYPES:
            from test_gguf_support import random_kquant_blocks   # tests/ (on sys.path below)
            t = gguf.GGMLQuantizationType[qtype]
            rng = np.random.default_rng(zlib.crc32(name.encode()))
            flat = v.reshape(-1, v.shape[-1])
            blocks = random_kquant_blocks(flat.shape, qtype, rng, scale=float(flat.std()))
            w.add_tensor(name, blocks.reshape(*v.shape[:-1], -1), raw_dtype=t)
        else:
            t = gguf.GGMLQuantizationType[qtype]
            w.add_tensor(name, gguf.quants.quantize(v.astype(np.float32), t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def spm_vocab(size: int, seed: int = 0) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary of `size` tokens as llama.cpp stores one: <unk> <s> </s>, the 256 byte
    tokens, single characters, then random pieces built from earlier ones (so every piece has a merge path)."""
    rng = np.random.default_rng(seed)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    chars = ["\u2581"] + list("etaoinshrdlcumwfgypbvkjxqzETAOINSHRDLC0123456789.,!?'-:;()") + list("éü日本")
    tokens += chars
    types += [1] * len(chars)
    seen = set(tokens)
    pieces = list(chars)
    while len(tokens) < size:
        a, b = pieces[int(rng.integers(len(pieces)))], pieces[int(rng.integers(len(pieces)))]
        p = ("\u2581" + a.lstrip("\u2581") if rng.random() < 0.4 else a) + b.lstrip("\u2581")
        if p in seen or len(p) > 8:
            continue
        seen.add(p)
        pieces.append(p)
        tokens.append(p)
        types.append(1)
    tokens, types = tokens[:size], types[:size]
    scores = [0.0] * 3 + [0.0] * 256 + [-float(i) for i in range(size - 259)]
    return tokens, scores[:size], types


def add_spm_vocab(w, size: int, seed: int = 0) -> None:
    tokens, scores, types = spm_vocab(size, seed)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)


# ------------------------------------------------------------------------------------------------ quantize

def llama_quantize_available() -> bool:
    return os.path.isfile(LLAMA_QUANTIZE) and os.access(LLAMA_QUANTIZE, os.X_OK)


def quantize_file(src: str, dst: str, qtype: str, rng: np.random.Generator) -> str:
    """llama-quantize src → dst as `qtype` ("MIX": a random per-tensor mix of types). Returns a description."""
    args = [LLAMA_QUANTIZE, "--allow-requantize"]
    desc = qtype
    if qtype == "MIX":
        choices = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_nl", "iq4_xs"]
        picks = {t: str(rng.choice(choices)) for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                                       "ffn_up", "ffn_down")}
        for t, q in picks.items():
            args += ["--tensor-type", f"{t}={q}"]
        args += ["--token-embedding-type", str(rng.choice(choices)), "--output-tensor-type", str(rng.choice(choices))]
        desc = "MIX(" + ",".join(f"{k}={v}" for k, v in picks.items()) + f",{args[-3]},{args[-1]})"
        base = "Q4_K_M"
    else:
        base = qtype
        if qtype in PURE_OK and rng.random() < 0.5:
            args.append("--pure")
            desc += "/pure"
    args += [src, dst, base, "1"]
    r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0:
        tail = [ln for ln in (r.stdout + r.stderr).splitlines() if "error" in ln.lower() or "failed" in ln.lower()]
        raise RuntimeError(f"llama-quantize failed ({r.returncode}): {' | '.join(tail[-4:]) or r.stderr[-400:]}")
    return desc


def tensor_types(path: str) -> str:
    from exllamav2.gguf.header import read_header
    counts: dict[str, int] = {}
    for t in read_header(path).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return " ".join(f"{k}:{v}" for k, v in sorted(counts.items()))


# ------------------------------------------------------------------------------------------------ oracles

def hf_from_file(hf, kind: str, path: str):
    """A copy of `hf` holding the file's weights, dequantised by gguf-py from the file itself (this script's name
    table and llama.cpp's permutation undone; independent of exllamav2's loader)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    cfg = hf.config
    reader = GGUFReader(path)
    values = {}
    for t in reader.tensors:
        v = dequantize(t.data, t.tensor_type).astype(np.float32)
        values[t.name] = v.reshape(tuple(int(d) for d in reversed(t.shape.tolist())))
    model = copy.deepcopy(hf)
    sd = model.state_dict()
    table = GEMMA3_BLOCK if kind == "gemma3" else BLOCK
    new = {}
    for name in sd:
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name.startswith("model.layers."):
            _, _, i, rest = name.split(".", 3)
            if ".experts." in rest:
                if rest.endswith("gate_up_proj"):
                    v = np.concatenate([values[f"blk.{i}.ffn_gate_exps.weight"], values[f"blk.{i}.ffn_up_exps.weight"]], 1)
                else:
                    v = values[f"blk.{i}.ffn_down_exps.weight"]
                new[name] = torch.from_numpy(v.copy())
                continue
            part, suffix = rest.rsplit(".", 1)
            g = f"blk.{i}.{table[part]}.{suffix}"
        else:
            part, suffix = name.rsplit(".", 1)
            g = f"{TOP[part]}.{suffix}"
        v = values[g]
        if GGUF_ARCH[kind] == "llama" and g.endswith(("attn_q.weight", "attn_k.weight")):
            n = cfg.num_attention_heads if "attn_q" in g else cfg.num_key_value_heads
            # inverse of permute
            v = v.reshape(n, v.shape[0] // n // 2, 2, *v.shape[1:]).swapaxes(1, 2).reshape(v.shape)
        if kind == "gemma3" and "norm" in g:
            v = v - 1.0
        new[name] = torch.from_numpy(np.ascontiguousarray(v)).reshape(sd[name].shape)
    missing = [k for k in sd if k not in new and not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    assert not missing, missing
    model.load_state_dict(new, strict=False)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def hf_gguf_loader(path: str):
    import transformers
    m = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                          dtype=torch.float32)
    return m.eval()


# ------------------------------------------------------------------------------------------------ ours

def load_ours(path: str, dtype: str, max_seq_len: int = 256):
    from exllamav2 import ExLlamaV2, ExLlamaV2Config
    cfg = ExLlamaV2Config(path)
    cfg.dtype = dtype
    cfg.max_seq_len = max_seq_len
    m = ExLlamaV2(cfg)
    m.load()
    return m


def ours_teacher_forced(model, ids: torch.Tensor, prompt: int, backend: str | None = None) -> torch.Tensor:
    """Logits (1, T-prompt+1, V): prefill of ids[:, :prompt], then one token at a time over the rest."""
    from exllamav2 import ExLlamaV2Cache, ops
    with ops.use_backend(backend):
        cache = ExLlamaV2Cache(model, batch_size=ids.shape[0], max_seq_len=ids.shape[1] + 4)
        out = [model.forward(ids[:, :prompt], cache, last_id_only=True)[:, -1:].float()]
        for i in range(prompt, ids.shape[1]):
            out.append(model.forward(ids[:, i:i + 1], cache)[:, -1:].float())
    return torch.cat(out, 1)


def hf_teacher_forced(hf, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    with torch.inference_mode():
        logits = hf(ids).logits.float()
    return logits[:, prompt - 1:]


class KernelAudit:
    """While active, every call of the cpu backend's GGUF kernel (GgufGemvKernel, the C++ GEMV over the file's
    blocks: dense linears and MoE experts alike) is checked against x @ W.T in fp32, W dequantised by gguf-py from
    the file (GgufWeight._reference). Error: |y - ref| in norm over |ref| per call; the worst per GGUF type is kept.
    The kernel quantises activations to int8 in two stages (~1e-5) and rounds its output to the model dtype, so
    fp16 calls sit near 5e-4 and bf16 near 4e-3 (tests/test_cpu_kernels.py: bf16 1e-2)."""
    TOL = {torch.float16: 3e-3, torch.bfloat16: 1.5e-2, torch.float32: 1e-4}

    def __enter__(self):
        from exllamav2.ops.cpu import gemv_linear
        self.cls = gemv_linear.GgufGemvKernel
        self.orig = self.cls.__call__
        self.worst: dict[str, tuple[float, str, tuple]] = {}
        self.calls = 0
        refs: dict[int, torch.Tensor] = {}
        audit = self

        def call(kernel, x):
            y = audit.orig(kernel, x)
            q = kernel.quant
            if q is None:
                return y
            w = refs.get(id(kernel))
            if w is None:
                w = refs[id(kernel)] = q._reference(torch.float32)
            ref = x.float() @ w.t()
            if kernel.bias is not None:
                ref = ref + kernel.bias.float()
            err = ((y.float() - ref).norm() / ref.norm().clamp_min(1e-12)).item()
            tol = audit.TOL.get(x.dtype, 1e-2)
            key = "/".join(sorted(set(q.types)))
            audit.calls += 1
            if not torch.isfinite(y).all():
                err = float("inf")
            if err > audit.worst.get(key, (-1.0,))[0]:
                audit.worst[key] = (err, q.key, tuple(x.shape), tol, str(x.dtype).removeprefix("torch."))
            return y

        self.cls.__call__ = call
        return self

    def __exit__(self, *exc):
        self.cls.__call__ = self.orig

    def failures(self) -> list[str]:
        return [f"kernel {dt} {t} ({key}, x {list(shape)}): |y - x@W.T| / |x@W.T| = {e:.2e} > {tol:.0e}"
                for t, (e, key, shape, tol, dt) in self.worst.items() if e > tol]

    def summary(self) -> str:
        return " ".join(f"{t}:{e[0]:.0e}" for t, e in sorted(self.worst.items()))


def kernel_kinds(model, dtype: str) -> str:
    """Which kernel classes the default backend prepared for the model's linears (to see the C++ path ran)."""
    from exllamav2 import ops
    from exllamav2.linear import ExLlamaV2Linear
    dt = getattr(torch, dtype)
    kinds: dict[str, int] = {}
    with ops.use_backend(None):
        for mod in model.modules:
            for sub in [mod, *getattr(mod, "submodules", [])]:
                for lin in [v for v in vars(sub).values() if isinstance(v, ExLlamaV2Linear)]:
                    try:
                        k = type(lin.kernel(dt)).__name__
                    except Exception as e:
                        k = f"err:{type(e).__name__}"
                    kinds[k] = kinds.get(k, 0) + 1
    return ",".join(f"{k}:{v}" for k, v in sorted(kinds.items()))


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-9)).item()


def greedy_disagreements(got: torch.Tensor, ref: torch.Tensor, tol_abs: float) -> list[int]:
    """Positions whose argmax differs where ref's top two are further apart than tol_abs (not a near-tie)."""
    top2 = ref.topk(2, -1).values
    clear = (top2[..., 0] - top2[..., 1]) > tol_abs
    differ = got.argmax(-1) != ref.argmax(-1)
    return torch.nonzero((differ & clear).flatten()).flatten().tolist()


def greedy_loop(model, ids: torch.Tensor, steps: int) -> list[int]:
    from exllamav2 import ExLlamaV2Cache
    cache = ExLlamaV2Cache(model, 1, ids.shape[1] + steps + 2)
    logits = model.forward(ids, cache, last_id_only=True)
    out = []
    for _ in range(steps):
        t = int(logits[0, -1].argmax())
        out.append(t)
        logits = model.forward(torch.tensor([[t]]), cache)
    return out, None


def greedy_loop_logits(model, ids: torch.Tensor, steps: int):
    from exllamav2 import ExLlamaV2Cache
    cache = ExLlamaV2Cache(model, 1, ids.shape[1] + steps + 2)
    logits = model.forward(ids, cache, last_id_only=True)[:, -1].float()
    out, all_logits = [], [logits]
    for _ in range(steps):
        t = int(logits[0].argmax())
        out.append(t)
        logits = model.forward(torch.tensor([[t]]), cache)[:, -1].float()
        all_logits.append(logits)
    return out, torch.stack(all_logits, 1)


def dynamic_greedy(model, prompts: list[torch.Tensor], steps: int) -> list[list[int]]:
    from exllamav2 import ExLlamaV2Cache, ExLlamaV2Tokenizer
    from exllamav2.generator import ExLlamaV2Sampler
    from exllamav2.generator.dynamic import ExLlamaV2DynamicGenerator
    from exllamav2.generator.dynamic_job import ExLlamaV2DynamicJob
    cache = ExLlamaV2Cache(model, 1, 16 * 16)
    gen = ExLlamaV2DynamicGenerator(model, cache, ExLlamaV2Tokenizer(model.config), page_size=16, max_chunk_size=16)
    jobs = [ExLlamaV2DynamicJob(p, steps, gen_settings=ExLlamaV2Sampler.Settings.greedy(), identifier=i,
                                stop_conditions=[]) for i, p in enumerate(prompts)]
    gen.enqueue(jobs)
    while gen.num_remaining_jobs():
        gen.iterate()
    return [list(j.new_token_ids) for j in jobs]


# ------------------------------------------------------------------------------------------------ one case

class Case:
    def __init__(self, seed: int, arch: str, qtype: str, workdir: str, hf_loader: bool = True, dtypes=("bfloat16", "float16"),
                 checks=("oracle", "kernels", "batch", "dynamic"), quantizer: str = "auto"):
        self.seed, self.arch, self.qtype, self.workdir = seed, arch, qtype, workdir
        self.hf_loader, self.dtypes, self.checks, self.quantizer = hf_loader, dtypes, checks, quantizer
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.audit_calls = 0

    def fail(self, msg: str):
        self.problems.append(msg)

    def build(self) -> str | None:
        rng = np.random.default_rng(self.seed + 7919)
        self.hf = random_model(self.arch, self.seed)
        c = self.hf.config
        self.shape = (f"h{c.hidden_size} hd{c.head_dim} q{c.num_attention_heads}/kv{c.num_key_value_heads} "
                      f"ffn{c.intermediate_size} V{c.vocab_size} L{c.num_hidden_layers} "
                      f"{'tied' if c.tie_word_embeddings else 'untied'}")
        os.makedirs(self.workdir, exist_ok=True)
        path = os.path.join(self.workdir, "model.gguf")
        use_lq = self.quantizer == "llama" or (self.quantizer == "auto" and llama_quantize_available())
        if self.qtype == "F16":
            write_f16_gguf(self.hf, self.arch, path)
            self.desc = "F16"
        elif use_lq:
            f16 = write_f16_gguf(self.hf, self.arch, os.path.join(self.workdir, "f16.gguf"))
            try:
                self.desc = quantize_file(f16, path, self.qtype, rng)
            except RuntimeError as e:  # llama.cpp's own refusal (e.g. its "quantized data validation failed")
                self.skip_reason = str(e)
                return None
            os.remove(f16)
        elif self.qtype in GGUF_PY_TYPES:
            write_f16_gguf(self.hf, self.arch, path, qtype=self.qtype)
            self.desc = self.qtype + "/gguf-py"
        else:
            return None
        self.path = path
        self.types = tensor_types(path)
        return path

    def run(self):
        g = torch.Generator().manual_seed(self.seed)
        V = self.hf.config.vocab_size
        prompt = 9 + self.seed % 13
        ids = torch.randint(3, V, (1, prompt + 12), generator=g)
        oracle = hf_from_file(self.hf, self.arch, self.path)
        ref = hf_teacher_forced(oracle, ids, prompt)
        span = ref.abs().max().item()
        self.span = span
        ours32 = load_ours(self.path, "float32")
        if "oracle" in self.checks:
            got = ours_teacher_forced(ours32, ids, prompt)
            e = rel_err(got, ref)
            self.notes.append(f"fp32 {e:.1e}")
            if e > TOL_ORACLE:
                self.fail(f"oracle: ours fp32 vs HF on the file's dequantised weights: max |diff| {e:.2e} of span "
                          f"{span:.3f} (tol {TOL_ORACLE})")
            if self.hf_loader:
                try:
                    hfl = hf_gguf_loader(self.path)
                except Exception as ex:  # HF cannot take this family/type: note it, not ours
                    self.notes.append(f"HF-gguf n/a ({type(ex).__name__})")
                else:
                    e2 = rel_err(hf_teacher_forced(hfl, ids, prompt), ref)
                    e3 = rel_err(got, hf_teacher_forced(hfl, ids, prompt))
                    self.notes.append(f"HF-gguf {e3:.1e}")
                    if e2 > TOL_ORACLE:
                        self.notes.append(f"NOTE HF's GGUF loader differs from the dequantised oracle by {e2:.1e}")
                    elif e3 > TOL_ORACLE:
                        self.fail(f"oracle: ours fp32 vs HF's GGUF loader: {e3:.2e}")
                    del hfl
        if "kernels" in self.checks:
            for dt in self.dtypes:
                m = load_ours(self.path, dt)
                with KernelAudit() as audit:
                    cpu = ours_teacher_forced(m, ids, prompt)
                self.audit_calls += audit.calls
                for f in audit.failures():
                    self.fail(f)
                tor = ours_teacher_forced(m, ids, prompt, "torch")
                e_cpu, e_tor, e_ct = rel_err(cpu, ref), rel_err(tor, ref), rel_err(cpu, tor)
                self.notes.append(f"{dt[:4]} cpu {e_cpu:.1e} torch {e_tor:.1e} cpu-torch {e_ct:.1e} [{kernel_kinds(m, dt)}]")
                self.notes.append(f"audit[{audit.calls}] {audit.summary()}")
                # model level, a sanity bound (the per-call audit above is the tight check): MoE routing can
                # flip an expert at a near-tie in bf16/fp16 on either path (HF's own bf16 run flips the same ones)
                allowed = 2 * e_tor + (5e-3 if dt == "bfloat16" else 1e-3)
                if self.arch in ("mixtral", "qwen2moe", "qwen3moe"):
                    allowed = max(allowed, 1.0)
                if e_cpu > allowed or not torch.isfinite(cpu).all():
                    self.fail(f"kernels {dt}: default backend vs fp32 oracle {e_cpu:.2e} of span, torch backend "
                              f"{e_tor:.2e} (allowed {allowed:.2e}); cpu vs torch {e_ct:.2e}")
                bad = greedy_disagreements(cpu, ref, 2 * (allowed * span))
                if bad and allowed < 1.0:
                    self.fail(f"kernels {dt}: greedy token differs from fp32 oracle at clear positions {bad}")
                del m
        if "batch" in self.checks:
            self.check_batch(ours32, g)
        if "dynamic" in self.checks:
            self.check_dynamic(ours32, g, "float32")
            if self.dtypes:
                m = load_ours(self.path, self.dtypes[0])
                self.check_dynamic(m, g, self.dtypes[0])
                del m

    def check_batch(self, model, g):
        from exllamav2 import ExLlamaV2Cache
        V = model.config.vocab_size
        lens = [5 + int(torch.randint(0, 20, (1,), generator=g)) for _ in range(3)]
        prompts = [torch.randint(3, V, (1, n), generator=g) for n in lens]
        T, steps = max(lens), 12
        ids = torch.zeros(3, T, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, T - p.shape[1]:] = p[0]
        pad = torch.tensor([[T - n] for n in lens])
        mask = torch.arange(T).unsqueeze(0) >= pad
        cache = ExLlamaV2Cache(model, 3, T + steps + 2)
        logits = model.forward(ids, cache, input_mask=mask, position_offsets=-pad, last_id_only=True)[:, -1].float()
        batch_logits = [logits]
        toks = []
        full_mask = mask
        for _ in range(steps):
            t = logits.argmax(-1, keepdim=True)
            toks.append(t)
            full_mask = torch.cat([full_mask, torch.ones(3, 1, dtype=torch.bool)], 1)
            logits = model.forward(t, cache, input_mask=full_mask, position_offsets=-pad)[:, -1].float()
            batch_logits.append(logits)
        batch_logits = torch.stack(batch_logits, 1)
        toks = torch.cat(toks, 1)
        for i, p in enumerate(prompts):
            alone_toks, alone = greedy_loop_logits(model, p, steps)
            e = rel_err(batch_logits[i], alone[0])
            if e > TOL_BATCH:
                self.fail(f"batch: row {i} (prompt {lens[i]}, padded {T - lens[i]}) logits differ from alone by "
                          f"{e:.2e} of span")
            if toks[i].tolist() != alone_toks:
                # a near-tie at the first differing step is tolerated
                k = next(j for j, (a, b) in enumerate(zip(toks[i].tolist(), alone_toks)) if a != b)
                top2 = alone[0, k].topk(2).values
                if (top2[0] - top2[1]).item() > 2 * TOL_BATCH * alone.abs().max().item():
                    self.fail(f"batch: row {i} greedy tokens differ from alone at step {k}: "
                              f"{toks[i].tolist()} vs {alone_toks}")

    def check_dynamic(self, model, g, dt):
        V = model.config.vocab_size
        prompts = [torch.randint(3, V, (1, 4 + int(torch.randint(0, 40, (1,), generator=g)))) for _ in range(3)]
        steps = 12
        dyn = dynamic_greedy(model, prompts, steps)
        for i, p in enumerate(prompts):
            ref_toks, ref_logits = greedy_loop_logits(model, p, steps)
            if dyn[i] != ref_toks:
                k = next((j for j, (a, b) in enumerate(zip(dyn[i], ref_toks)) if a != b), min(len(dyn[i]), len(ref_toks)))
                if k < len(ref_toks) and k < len(dyn[i]):
                    top2 = ref_logits[0, k].topk(2).values
                    margin = (top2[0] - top2[1]).item() / ref_logits.abs().max().item()
                    tie = 1e-4 if dt == "float32" else 2e-2
                    if margin <= tie:
                        continue
                else:
                    margin = float("nan")
                self.fail(f"dynamic {dt}: prompt {i} (len {p.shape[1]}) generator tokens {dyn[i]} vs forward loop "
                          f"{ref_toks} (first diff at {k}, top-2 margin {margin:.1e} of span)")


# ------------------------------------------------------------------------------------------------ CLI

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cases", type=int, default=8)
    ap.add_argument("--arch", default=",".join(ARCHS), help=f"comma list of {', '.join(ARCHS)}")
    ap.add_argument("--types", default=",".join(TYPES), help="comma list of llama-quantize types (and MIX, F16)")
    ap.add_argument("--checks", default="oracle,kernels,batch,dynamic")
    ap.add_argument("--dtypes", default="bfloat16,float16", help="dtypes for the kernel check")
    ap.add_argument("--no-hf-loader", action="store_true", help="skip HF's own GGUF loader")
    ap.add_argument("--quantizer", choices=("auto", "llama", "gguf-py"), default="auto")
    ap.add_argument("--keep", default=None, help="keep the case files under this folder")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    archs = [a for a in args.arch.split(",") if a]
    types = [t for t in args.types.split(",") if t]
    for a in archs:
        if a not in ARCHS:
            ap.error(f"unknown arch {a!r}; choose from {', '.join(ARCHS)}")
    if args.quantizer != "gguf-py" and not llama_quantize_available():
        print(f"llama-quantize not found at {LLAMA_QUANTIZE}: using the gguf library's quantizers; types it cannot "
              f"make are skipped ({', '.join(t for t in types if t not in GGUF_PY_TYPES and t != 'F16')})")
        if args.quantizer == "llama":
            return 2
    rng = np.random.default_rng(args.seed)
    root = args.keep or tempfile.mkdtemp(prefix="fuzz_gguf_")
    failures = 0
    for n in range(args.cases):
        arch = archs[int(rng.integers(len(archs)))]
        qtype = types[int(rng.integers(len(types)))]
        seed = args.seed * 1000 + n
        case = Case(seed, arch, qtype, os.path.join(root, f"case{n}"), hf_loader=not args.no_hf_loader,
                    dtypes=tuple(d for d in args.dtypes.split(",") if d), checks=tuple(args.checks.split(",")),
                    quantizer=args.quantizer)
        t0 = time.time()
        head = f"[{n}] seed={seed} {arch:8s} {qtype:7s}"
        try:
            if case.build() is None:
                why = getattr(case, "skip_reason", None) or \
                    f"no quantizer for {qtype} here (llama-quantize absent, gguf-py cannot make it)"
                print(f"{head} SKIP: {why}")
                continue
            case.run()
        except Exception as e:
            case.fail(f"exception: {type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}")
        status = "FAIL" if case.problems else "ok"
        print(f"{head} {status:4s} {getattr(case, 'shape', '')} | {getattr(case, 'desc', '')} | "
              f"{getattr(case, 'types', '')} | {'; '.join(case.notes)} ({time.time() - t0:.0f}s)", flush=True)
        for p in case.problems:
            print(f"    MISMATCH: {p}", flush=True)
        if case.problems:
            failures += 1
            print(f"    repro: python bench/fuzz_gguf.py --seed {args.seed} --cases {n + 1} --arch {args.arch} "
                  f"--types {args.types}  (case {n}; files kept with --keep DIR)", flush=True)
        elif not args.keep:
            shutil.rmtree(case.workdir, ignore_errors=True)
    print(f"{args.cases} cases, {failures} with mismatches")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
