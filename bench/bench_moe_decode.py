"""Decode tokens/s of a random-weight MoE model on the CPU: eager, the compiled step with the static routing path
(every expert over every token, `ExLlamaV2MoEMLP.static_routing = True`) and the compiled step with the grouped
path as one opaque op (exllamav2/moe_grouped_op.py, the default), side by side in one process. Each repetition
times every path in turn (the minimum per path is reported); each path's logits are compared with eager's over
the same fed tokens. "expert MB/step" is the expert weights a step reads (eager and the op: at most top-k x batch
distinct experts per layer). The static graph takes ~20 min to compile the first time on 2 cores (768 GEMMs in
the default shape), then loads from inductor's disk cache in ~20 s.

    python bench/bench_moe_decode.py          # Qwen3-MoE shape at small width: 64 experts top-8, hidden 512,
                                              # moe_intermediate 256, 4 layers, bf16, batch 1, 2 threads
    python bench/bench_moe_decode.py --batch 4 --experts 128
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch


def build(path: str, args) -> str:
    import transformers as tf
    cfg = tf.Qwen3MoeConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                            moe_intermediate_size=args.moe_intermediate, num_hidden_layers=args.layers,
                            num_attention_heads=args.hidden // 64, num_key_value_heads=max(1, args.hidden // 256),
                            head_dim=64, num_experts=args.experts, num_experts_per_tok=args.top_k,
                            norm_topk_prob=True, max_position_embeddings=4096)
    torch.manual_seed(0)
    hf = tf.Qwen3MoeForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)  # HF's init leaves the 3-D expert tensors unscaled
    hf.save_pretrained(path, safe_serialization=True)
    return path


def decode(model, cache, prompt, tokens):
    """Feed `tokens` (b, n) one step at a time after the prompt: wall seconds of the steps and their logits."""
    cache.current_seq_len = 0
    model.forward(prompt, cache, preprocess_only=True)
    out = []
    t0 = time.perf_counter()
    for i in range(tokens.shape[1]):
        out.append(model.forward(tokens[:, i:i + 1], cache)[:, -1])
    return time.perf_counter() - t0, torch.stack(out, 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--moe-intermediate", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
    from exllamav2.moe_mlp import ExLlamaV2MoEMLP

    seq = args.prompt + args.tokens + 1
    with tempfile.TemporaryDirectory() as tmp:
        cfg = ExLlamaV2Config(build(tmp, args))
        cfg.max_seq_len = seq
        model = ExLlamaV2(cfg)
        model.load()
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, args.vocab, (args.batch, args.prompt), generator=g)
    tokens = torch.randint(0, args.vocab, (args.batch, args.tokens), generator=g)
    cache = ExLlamaV2Cache(model, batch_size=args.batch, max_seq_len=seq)

    # path -> (ExLlamaV2MoEMLP.static_routing while it runs, its decode runner)
    paths = {"eager": (None, None)}
    for name, static in (("compiled, static (all experts)", True), ("compiled, grouped op", None)):
        ExLlamaV2MoEMLP.static_routing = static
        t0 = time.perf_counter()
        runner = model.compile_decode(batch_sizes=(args.batch,), max_seq_len=seq, progress=False)
        print(f"{name}: compiled in {time.perf_counter() - t0:.0f} s", flush=True)
        paths[name] = (static, runner)

    best, logits = {}, {}
    for rep in range(args.reps + 1):  # repetition 0 warms every path up
        for name, (static, runner) in paths.items():
            ExLlamaV2MoEMLP.static_routing = static
            model.decode_runner = runner
            dt, out = decode(model, cache, prompt, tokens)
            if rep:
                best[name] = min(best.get(name, dt), dt)
            logits[name] = out
    ExLlamaV2MoEMLP.static_routing = None
    model.decode_runner = None

    E, k, L = args.experts, args.top_k, args.layers
    expert_mb = 3 * args.hidden * args.moe_intermediate * 2 / 2 ** 20  # one expert's gate/up/down in bf16
    read = {"eager": min(E, k * args.batch), "compiled, static (all experts)": E,
            "compiled, grouped op": min(E, k * args.batch)}
    print(f"\nQwen3-MoE shape, random weights, bf16: {E} experts top-{k}, hidden {args.hidden}, moe_intermediate "
          f"{args.moe_intermediate}, {L} layers; batch {args.batch}, {args.tokens} decode steps after a "
          f"{args.prompt}-token prompt, {args.threads} threads; best of {args.reps}")
    print(f"{'path':34s} {'tok/s':>9s} {'ms/step':>8s} {'vs eager':>9s} {'expert MB/step':>15s} "
          f"{'max |logit - eager|':>20s}")
    for name in paths:
        ms = best[name] / args.tokens * 1e3
        tps = args.batch * args.tokens / best[name]
        diff = (logits[name] - logits["eager"]).abs().max().item()
        print(f"{name:34s} {tps:9.1f} {ms:8.2f} {best['eager'] / best[name]:8.2f}x "
              f"{'<=' if read[name] < E else '  '}{read[name] * L * expert_mb:13.1f} {diff:20.3g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
