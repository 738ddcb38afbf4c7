"""What batch invariance (ops.set_batch_invariant; on by default) costs: prefill and decode tokens/s of the
dynamic generator with it switched off (set_batch_invariant(False)) and on (the default), for SmolLM2 in its default
weights (GGUF blocks packed: invariant either way, so the option changes nothing there) and dequantized to dense
bf16 (on, the bf16 GEMV runs every batch size; off, oneDNN above 8 rows). With --check, also how many of 16 greedy requests give
the same tokens among 16 as alone.

    python bench/bench_determinism.py [-m MODEL] [--tokens 32] [--prompt-tokens 512] [--check]

One process; the modes interleave per repetition so machine noise hits them alike; the best of --reps is shown.
"""

from __future__ import annotations

import argparse
import time

import torch

PROMPTS = ["Write a haiku about the sea.", "What is 17 times 23?", "Name three prime numbers.",
           "Explain gravity to a child.", "Give me a recipe for pancakes.", "What is the capital of Peru?",
           "Tell me a joke about cats.", "How do airplanes fly?", "List four colours of the rainbow.",
           "Why is the sky blue?", "Translate 'good morning' into French.", "What does a compiler do?",
           "Describe a sunset in one sentence.", "How many legs does a spider have?", "Suggest a name for a dog.",
           "What is photosynthesis?"]


def load(path: str | None, dense: bool):
    from exllamav2 import ExLlamaV2, ExLlamaV2Config, ExLlamaV2Tokenizer
    from exllamav2.default_models import smollm2_gguf_path

    cfg = ExLlamaV2Config(path or smollm2_gguf_path())
    cfg.max_seq_len = 2048
    cfg.gguf_dequantize = dense
    model = ExLlamaV2(cfg)
    model.load()
    return model, ExLlamaV2Tokenizer(cfg)


def generate(model, tok, prompts: list, tokens: int) -> tuple[list, float, float]:
    """(new tokens per job, prefill s, decode s) for all prompts (token id tensors) run together."""
    from exllamav2 import ExLlamaV2Cache
    from exllamav2.generator.dynamic import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob
    from exllamav2.generator.sampler import ExLlamaV2Sampler

    gen = ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, 1, 16384), tok, page_size=256,
                                    max_chunk_size=4096)
    jobs = [ExLlamaV2DynamicJob(ids, tokens, gen_settings=ExLlamaV2Sampler.Settings.greedy(), stop_conditions=[])
            for ids in prompts]
    gen.enqueue(jobs)
    t0 = time.perf_counter()
    t1 = None
    while gen.num_remaining_jobs():
        gen.iterate()
        if t1 is None and all(j.new_token_ids for j in jobs):
            t1 = time.perf_counter()
    return [j.new_token_ids for j in jobs], t1 - t0, time.perf_counter() - t1


def main() -> None:
    ap = argparse.ArgumentParser(description="cost of batch invariance in the dynamic generator")
    ap.add_argument("-m", "--model", default=None, help="model folder or .gguf (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per job")
    ap.add_argument("--prompt-tokens", type=int, default=512, help="length of the prefill-speed prompt")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--check", action="store_true", help="also count requests that change among 16 (slow)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from exllamav2 import ops

    rows = []
    for dense in (False, True):
        model, tok = load(args.model, dense)
        chats = [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]), encode_special_tokens=True)
                 for p in PROMPTS]
        long = torch.randint(100, 40000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
        generate(model, tok, chats[:2], 4)  # warm-up
        best: dict = {}
        for _ in range(args.reps):
            for inv in (False, None):
                ops.set_batch_invariant(inv)
                _, pre, _ = generate(model, tok, [long], 1)
                _, _, dec1 = generate(model, tok, chats[:1], args.tokens)
                _, _, dec16 = generate(model, tok, chats, args.tokens)
                r = (args.prompt_tokens / pre, (args.tokens - 1) / dec1, 16 * (args.tokens - 1) / dec16)
                best[inv] = tuple(max(a, b) for a, b in zip(best.get(inv, (0, 0, 0)), r))
        for inv in (False, None):
            same = "-"
            if args.check:
                ops.set_batch_invariant(inv)
                together, _, _ = generate(model, tok, chats, args.tokens)
                same = sum(generate(model, tok, [c], args.tokens)[0][0] == t for c, t in zip(chats, together))
                same = f"{same}/16"
            rows.append(("dense bf16" if dense else "GGUF packed", "off" if inv is False else "on", *best[inv], same))
        ops.set_batch_invariant(None)
        del model

    print(f"\nbatch invariance cost, {torch.get_num_threads()} threads, best of {args.reps}\n")
    print(f"{'weights':<12} {'invariant':>9} {'prefill tok/s':>14} {'decode 1 tok/s':>15} {'decode 16 tok/s':>16} "
          f"{'same alone/16':>14}")
    for w, inv, pre, d1, d16, same in rows:
        print(f"{w:<12} {inv:>9} {pre:>14.1f} {d1:>15.1f} {d16:>16.1f} {same:>14}")


if __name__ == "__main__":
    main()
