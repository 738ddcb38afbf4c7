"""End-to-end GPU decode: a Llama-3-8B-shaped EXL2 model with random weights, through this engine (Triton linears
and paged attention, the decode step captured as CUDA graphs), the original exllamav2 and HF transformers, in one
run.

    python bench/gpu/bench_decode.py [--bpw 4.0] [--out DIR] [--original-wheel WHL] [--no-hf]
    python bench/gpu/bench_decode.py --cpu --out DIR     # interpreter, tiny model (tests/test_bench_decode.py)

Measured: batch-1 decode tok/s through `model.forward` (the seed API) and the attained weight bandwidth (resident
weight bytes x tok/s); 2048-token prefill tok/s; the dynamic generator's throughput with 32 and 128 concurrent jobs;
peak memory; and whether concurrent greedy jobs give each job's tokens alone. The original exllamav2 (its PyPI
wheel, `--original-wheel`, installed into a private folder and run in a subprocess, since both packages are named
`exllamav2`; its CUDA extension builds at first import, which takes minutes) and HF transformers (fp16, static
cache) decode the same shapes. Random weights decode as fast as real ones; their tokens mean nothing. Writes
`bench_decode.json` and `bench_decode.md` to --out (default $OUT, else the current folder).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, HERE)

import torch  # noqa: E402

SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, head_dim=128),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, head_dim=64),
}
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")
PEAK_GBS = {"H200": 4800, "H100": 3350, "A100": 2039, "4090": 1008, "3090": 936}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- the model

def linear_shape(name: str, s: dict) -> tuple[int, int]:
    h, i, d = s["hidden_size"], s["intermediate_size"], s["head_dim"]
    return {"self_attn.q_proj": (s["num_attention_heads"] * d, h), "self_attn.k_proj": (s["num_key_value_heads"] * d, h),
            "self_attn.v_proj": (s["num_key_value_heads"] * d, h), "self_attn.o_proj": (h, s["num_attention_heads"] * d),
            "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}[name]


def build_model_dir(path: str, shape: str, bpw: float, device, seed: int = 0) -> str:
    """config.json and model.safetensors: EXL2 decoder linears (random codes in the real layout, bench_linears.py),
    fp16 embedding, norms and head."""
    from safetensors.torch import save_file
    from bench_linears import exl2_tensors
    s = SHAPES[shape]
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **s, "max_position_embeddings": 8192,
           "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "torch_dtype": "float16", "tie_word_embeddings": False,
           "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu"}
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    gen = torch.Generator(device=device).manual_seed(seed)
    h, v = s["hidden_size"], s["vocab_size"]
    t = {"model.embed_tokens.weight": torch.randn(v, h, device=device, generator=gen).half() * 0.02,
         "model.norm.weight": torch.ones(h, dtype=torch.float16, device=device),
         "lm_head.weight": torch.randn(v, h, device=device, generator=gen).half() * 0.02}
    for layer in range(s["num_hidden_layers"]):
        pre = f"model.layers.{layer}."
        t[pre + "input_layernorm.weight"] = torch.ones(h, dtype=torch.float16, device=device)
        t[pre + "post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.float16, device=device)
        for name in LINEARS:
            out, n_in = linear_shape(name, s)
            for k, x in exl2_tensors(out, n_in, bpw, device, gen).items():
                t[f"{pre}{name}.{k}"] = x
        log(f"  built layer {layer + 1}/{s['num_hidden_layers']}")
    save_file({k: x.contiguous().cpu() for k, x in t.items()}, os.path.join(path, "model.safetensors"))
    write_tokenizer(path, v)
    return path


def write_tokenizer(path: str, vocab: int) -> None:
    """A word-level vocabulary of `vocab` made-up words ("w0", "w1", ...), so the generators can decode text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "w1", "eos_token": "w2", "unk_token": "w0"}, f)


# ---------------------------------------------------------------------------------------------- ours

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def weight_bytes(path: str) -> int:
    """Bytes a decode step reads: every tensor of the file but the embedding table (one row per token). The
    triton backend keeps the file's packed tensors as they are (tests/test_triton_linear_model.py holds resident
    bytes within 5% of the file's)."""
    from safetensors import safe_open
    total = 0
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        for k in f.keys():
            if "embed_tokens" not in k:
                sl = f.get_slice(k)
                n = 1
                for d in sl.get_shape():
                    n *= d
                total += n * {"F16": 2, "BF16": 2, "F32": 4, "I32": 4, "I16": 2}[sl.get_dtype()]
    return total


def run_ours(path: str, device, n_decode: int, prefill: int, concurrency: list[int], new_tokens: int) -> dict:
    """On a GPU the decode step is captured as CUDA graphs (model.compile_decode); the --cpu check runs it eagerly
    in fp16 (the interpreter's bf16 matmuls are broken)."""
    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Tokenizer
    from exllamav2.generator import ExLlamaV2Sampler
    from exllamav2.generator.dynamic import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob
    res: dict = {}
    cfg = ExLlamaV2Config(path)
    cfg.max_seq_len = max(4096, prefill + 64)
    if device.type == "cpu":
        cfg.dtype = "float16"
    model = ExLlamaV2(cfg)
    t0 = time.time()
    model.load()
    res["load_s"] = time.time() - t0
    res["weight_bytes"] = weight_bytes(path)
    tokenizer = ExLlamaV2Tokenizer(cfg)
    vocab = cfg.vocab_size
    gen = torch.Generator().manual_seed(0)
    if device.type == "cuda":
        model.compile_decode(progress=True)

    # batch-1 decode through the seed API
    cache = ExLlamaV2Cache(model, 1, cfg.max_seq_len)
    model.forward(torch.randint(0, vocab, (1, 16), generator=gen), cache)
    tok = torch.tensor([[1]])
    for _ in range(3):  # capture and warm up
        tok = model.forward(tok, cache)[:, -1:].argmax(-1).cpu()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n_decode):
        tok = model.forward(tok, cache)[:, -1:].argmax(-1).cpu()
    sync(device)
    dt = time.perf_counter() - t0
    res["decode_tok_s"] = n_decode / dt
    res["decode_gbs"] = res["weight_bytes"] * n_decode / dt / 1e9
    runner = model.decode_runner
    res["capture_s"] = runner.graphs.capture_seconds if runner is not None and runner.graphs else None

    # prefill
    ids = torch.randint(0, vocab, (1, prefill), generator=gen)
    for rep in range(2):
        cache.current_seq_len = 0
        sync(device)
        t0 = time.perf_counter()
        model.forward(ids, cache, preprocess_only=True)
        sync(device)
    res["prefill_tok_s"] = prefill / (time.perf_counter() - t0)
    del cache

    # concurrent jobs through the dynamic generator, and greedy tokens alone vs together
    greedy = ExLlamaV2Sampler.Settings.greedy()
    prompts = [torch.randint(0, vocab, (1, 24 + i % 8), generator=gen) for i in range(max(concurrency))]

    def run_jobs(n: int):
        dcache = ExLlamaV2Cache(model, 1, n * 256 + 256)
        dyn = ExLlamaV2DynamicGenerator(model, dcache, tokenizer, max_batch_size=n, page_size=256)
        jobs = [ExLlamaV2DynamicJob(prompts[i], new_tokens, gen_settings=greedy, stop_conditions=[],
                                    decode_special_tokens=False) for i in range(n)]
        out = {}
        for j in jobs:
            dyn.enqueue(j)
        sync(device)
        t0 = time.perf_counter()
        while dyn.num_remaining_jobs():
            for r in dyn.iterate():
                if r.get("stage") == "streaming":
                    out.setdefault(r["serial"], []).extend(r["token_ids"].flatten().tolist())
        sync(device)
        return [out[j.serial] for j in jobs], time.perf_counter() - t0

    res["concurrent"] = {}
    for n in concurrency:
        run_jobs(n)  # captures this batch size's graph
        toks, dt = run_jobs(n)
        res["concurrent"][n] = {"tok_s": n * new_tokens / dt}
        log(f"  {n} concurrent jobs: {n * new_tokens / dt:.0f} tok/s")
    k = min(8, max(concurrency))
    together, _ = run_jobs(k)
    alone = [run_jobs_single(model, tokenizer, prompts[i], new_tokens, greedy) for i in range(k)]
    res["greedy_alone_equals_together"] = together == alone
    if device.type == "cuda":
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return res


def run_jobs_single(model, tokenizer, prompt, new_tokens, greedy):
    from exllamav2 import ExLlamaV2Cache
    from exllamav2.generator.dynamic import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob
    dyn = ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, 1, 512), tokenizer, page_size=256)
    job = ExLlamaV2DynamicJob(prompt, new_tokens, gen_settings=greedy, stop_conditions=[], decode_special_tokens=False)
    dyn.enqueue(job)
    got = []
    while dyn.num_remaining_jobs():
        for r in dyn.iterate():
            if r.get("stage") == "streaming":
                got.extend(r["token_ids"].flatten().tolist())
    return got


# ---------------------------------------------------------------------------------------------- references

def run_hf(shape: str, device, n_decode: int, prefill: int) -> dict:
    """HF transformers, fp16, static cache, eager: the same shapes with random dense weights."""
    import transformers as tf
    s = SHAPES[shape]
    cfg = tf.LlamaConfig(**{k: v for k, v in s.items()}, max_position_embeddings=8192, rope_theta=500000.0,
                         torch_dtype=torch.float16)
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(cfg)
    model = model.to_empty(device=device).half().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    ids = torch.randint(0, s["vocab_size"], (1, 16), device=device)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static")
        sync(device)
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n_decode, min_new_tokens=n_decode, do_sample=False,
                       cache_implementation="static")
        sync(device)
        decode = n_decode / (time.perf_counter() - t0)
        long = torch.randint(0, s["vocab_size"], (1, prefill), device=device)
        model(long)
        sync(device)
        t0 = time.perf_counter()
        model(long)
        sync(device)
        pre = prefill / (time.perf_counter() - t0)
    return {"decode_tok_s": decode, "prefill_tok_s": pre}


ORIGINAL = r'''
import sys, time, json, torch
from exllamav2 import ExLlamaV2, ExLlamaV2Config, ExLlamaV2Cache
path, n, prefill = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cfg = ExLlamaV2Config(path); cfg.max_seq_len = max(4096, prefill + 64); cfg.max_input_len = prefill
cfg.max_attention_size = prefill ** 2
model = ExLlamaV2(cfg); cache = ExLlamaV2Cache(model, max_seq_len=cfg.max_seq_len, lazy=True)
model.load_autosplit(cache)
ids = torch.randint(0, cfg.vocab_size, (1, 16))
model.forward(ids, cache, preprocess_only=True)
tok = torch.tensor([[1]])
for _ in range(5): tok = model.forward(tok, cache)[:, -1:].argmax(-1).cpu()
torch.cuda.synchronize(); t0 = time.perf_counter()
for _ in range(n): tok = model.forward(tok, cache)[:, -1:].argmax(-1).cpu()
torch.cuda.synchronize(); dec = n / (time.perf_counter() - t0)
long = torch.randint(0, cfg.vocab_size, (1, prefill))
for _ in range(2):
    cache.current_seq_len = 0; torch.cuda.synchronize(); t0 = time.perf_counter()
    model.forward(long, cache, preprocess_only=True); torch.cuda.synchronize()
print(json.dumps({"decode_tok_s": dec, "prefill_tok_s": prefill / (time.perf_counter() - t0)}))
'''


def install_original(wheel: str) -> str:
    target = os.path.join(tempfile.gettempdir(), "exllamav2_original")
    if not os.path.isdir(os.path.join(target, "exllamav2")):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target, wheel],
                       check=True)
    return target


def original_env(target: str) -> dict:
    env = {**os.environ, "PYTHONPATH": target, "MAX_JOBS": str(os.cpu_count() or 8)}
    if torch.cuda.is_available():
        cc = torch.cuda.get_device_capability()
        env.setdefault("TORCH_CUDA_ARCH_LIST", f"{cc[0]}.{cc[1]}")
    return env


def start_original_build(target: str) -> subprocess.Popen:
    """The original builds its CUDA extension at first import: start that now, beside our measurements."""
    return subprocess.Popen([sys.executable, "-c", "import exllamav2.ext"], env=original_env(target),
                            cwd=tempfile.gettempdir(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def run_original(target: str, path: str, n_decode: int, prefill: int, timeout: float) -> dict:
    r = subprocess.run([sys.executable, "-c", ORIGINAL, path, str(n_decode), str(prefill)], env=original_env(target),
                       cwd=tempfile.gettempdir(), capture_output=True, text=True, timeout=timeout)
    if r.returncode:
        return {"error": (r.stderr or r.stdout).strip().splitlines()[-1:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------- report

def table(rep: dict) -> str:
    ours = rep["ours"]
    rows = [f"# GPU decode: {rep['device']}, {rep['shape']} EXL2 {rep['bpw']} bpw (random weights)", "",
            "| engine | decode tok/s (batch 1) | weight GB/s | share of bandwidth | prefill tok/s |",
            "|---|---|---|---|---|"]
    peak = rep.get("peak_gbs")
    share = f"{ours['decode_gbs'] / peak:.0%}" if peak else "n/a"
    rows.append(f"| ours | {ours['decode_tok_s']:.1f} | {ours['decode_gbs']:.0f} | {share} | "
                f"{ours['prefill_tok_s']:.0f} |")
    for name in ("original", "hf"):
        r = rep.get(name)
        if r and "decode_tok_s" in r:
            rows.append(f"| {name} | {r['decode_tok_s']:.1f} | | | {r['prefill_tok_s']:.0f} |")
        elif r:
            rows.append(f"| {name} | failed: {r.get('error')} | | | |")
    rows += ["", "| concurrent jobs | tok/s | x batch 1 |", "|---|---|---|"]
    for n, r in ours["concurrent"].items():
        rows.append(f"| {n} | {r['tok_s']:.0f} | {r['tok_s'] / ours['decode_tok_s']:.1f} |")
    rows += ["", f"greedy jobs alone == together: {ours['greedy_alone_equals_together']}; "
             f"weights read per token: {ours['weight_bytes'] / 2**30:.2f} GiB; "
             f"peak memory: {ours.get('peak_mem_gib', float('nan')):.1f} GiB"]
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="tiny model under Triton's interpreter (the suite's check)")
    ap.add_argument("--bpw", type=float, default=4.0, choices=(2.5, 4.0, 6.0))
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--model-dir", help="where to write (or reuse) the random model (default: a temp folder)")
    ap.add_argument("--original-wheel", help="the original exllamav2's wheel (0.3.2), to run beside ours")
    ap.add_argument("--no-hf", action="store_true")
    args = ap.parse_args(argv)
    if args.cpu:
        os.environ["TRITON_INTERPRET"] = "1"
        device, shape, n_decode, prefill, conc, new = torch.device("cpu"), "tiny", 3, 32, [2], 2
    else:
        if not torch.cuda.is_available():
            ap.error("no CUDA device: run with --cpu for the interpreter check")
        device, shape, n_decode, prefill, conc, new = torch.device("cuda"), "8b", 128, 2048, [32, 128], 64
    t_start = time.time()
    builder = None
    if args.original_wheel and device.type == "cuda":
        target = install_original(args.original_wheel)
        builder = start_original_build(target)
    path = args.model_dir or tempfile.mkdtemp(prefix="bench_decode_")
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        log(f"building the {shape} EXL2 {args.bpw} bpw model in {path}")
        build_model_dir(path, shape, args.bpw, device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter)"
    rep = {"device": name, "shape": shape, "bpw": args.bpw,
           "peak_gbs": next((v for k, v in PEAK_GBS.items() if k in name), None)}
    log("ours ...")
    rep["ours"] = run_ours(path, device, n_decode, prefill, conc, new)
    if not args.no_hf:
        log("HF transformers ...")
        try:
            rep["hf"] = run_hf(shape, device, n_decode, prefill)
        except Exception as e:  # a reference that fails is reported, not fatal
            rep["hf"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    if builder is not None:
        log("the original exllamav2 (waiting for its extension build) ...")
        try:
            builder.wait(timeout=max(30, 480 - (time.time() - t_start)))
            rep["original"] = run_original(target, path, n_decode, prefill, timeout=240)
        except subprocess.TimeoutExpired:
            builder.kill()
            rep["original"] = {"error": "its CUDA extension did not build in time"}
    rep["seconds"] = time.time() - t_start
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_decode.json"), "w") as f:
        json.dump(rep, f, indent=1, default=str)
    md = table(rep)
    with open(os.path.join(args.out, "bench_decode.md"), "w") as f:
        f.write(md + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
