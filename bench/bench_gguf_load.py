"""Start-up and accuracy of a GGUF model on the CPU, in one fresh process per mode.

    python bench/bench_gguf_load.py -m MODEL.gguf [--dense-embedding] [--quality]

Prints: `ExLlamaV2Config` (header and metadata), the tokenizer (its on-disk cache warm or cold, as found), `model.load()`
(weights packed for the GEMV), the first forward of 8 tokens, and the process's peak RSS after it. --dense-embedding
loads the token embedding as a dense table (what loads did before exllamav2/quant/gguf_embedding.py), for the
comparison. --quality adds, in bf16 against the same file loaded dense in fp32 (`gguf_dequantize`, the exact
reference path): the logits' relative error and top-1 agreement over tests/data/ppl_text.txt's first 256 tokens, and
the perplexity ratio over the whole text (1024-token windows, stride 512).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-m", "--model", required=True, help="GGUF file")
    p.add_argument("--dense-embedding", action="store_true", help="load the token embedding as a dense table")
    p.add_argument("--quality", action="store_true", help="bf16 against the fp32 dense load: logits, perplexity")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    import torch

    from exllamav2 import ExLlamaV2, ExLlamaV2Config
    from exllamav2.tokenizer import ExLlamaV2Tokenizer
    t_import = time.perf_counter() - t0
    if args.dense_embedding:
        import exllamav2.embedding as embedding
        embedding.ExLlamaV2Embedding._gguf_table = lambda self: None

    def load(**opts):
        cfg = ExLlamaV2Config(args.model)
        cfg.max_seq_len = cfg.max_input_len = 1024
        for k, v in opts.items():
            setattr(cfg, k, v)
        model = ExLlamaV2(cfg)
        model.load()
        return cfg, model

    t = time.perf_counter()
    cfg = ExLlamaV2Config(args.model)
    cfg.max_seq_len = cfg.max_input_len = 1024
    t_config = time.perf_counter() - t
    t = time.perf_counter()
    tokenizer = ExLlamaV2Tokenizer(cfg)
    t_tokenizer = time.perf_counter() - t
    t = time.perf_counter()
    model = ExLlamaV2(cfg)
    model.load()
    t_load = time.perf_counter() - t
    ids = torch.randint(0, 1000, (1, 8), generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    model.forward(ids)
    t_first = time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"model: {args.model}{' (dense embedding)' if args.dense_embedding else ''}")
    print(f"imports {t_import:.2f} s | config {t_config:.3f} s | tokenizer {t_tokenizer:.2f} s | load {t_load:.2f} s | "
          f"first forward {t_first:.3f} s | peak RSS {rss:.0f} MB")

    if args.quality:
        from exllamav2.perplexity import model_logits_fn, perplexity
        with open(os.path.join(ROOT, "tests", "data", "ppl_text.txt"), encoding="utf-8") as f:
            text = tokenizer.encode(f.read())[0]
        _, exact = load(dtype=torch.float32, gguf_dequantize=True)
        window = text[:256].unsqueeze(0)
        a, b = model.forward(window).float(), exact.forward(window).float()
        rel = ((a - b).norm() / b.norm()).item()
        top1 = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
        bos = tokenizer.bos_token_id if cfg.arch.lm.requires_bos else None
        ppl = [perplexity(model_logits_fn(m), text, length=1024, stride=512, bos_token_id=bos).perplexity
               for m in (model, exact)]
        print(f"bf16 against the fp32 dense load: logits {100 * rel:.2f}% relative, top-1 {100 * top1:.1f}%, "
              f"perplexity {ppl[0]:.4f} / {ppl[1]:.4f} ({100 * (ppl[0] / ppl[1] - 1):+.2f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
