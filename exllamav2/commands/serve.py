"""`python -m exllamav2 serve [-m MODEL]`: an OpenAI-compatible HTTP server (/v1/models, /v1/completions,
/v1/chat/completions, /health, /metrics) over the dynamic generator. Without -m it serves SmolLM2-135M-Instruct."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import add_cpu_activations_arg, apply_kernel_args

NAME = "serve"
EXTRAS = ("fastapi", "uvicorn")  # the `server` extra; prometheus_client is optional (/metrics answers 501 without)


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is outside 1..65535")
    return port


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(NAME, help="OpenAI-compatible HTTP server", description=__doc__.split(":", 1)[1].strip())
    p.add_argument("-m", "--model", default=None, help="model folder or .gguf file (default: SmolLM2-135M-Instruct)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port, default=8000, help="TCP port, 1..65535 (default 8000)")
    p.add_argument("--api-key", dest="api_key", default=None, help="require 'Authorization: Bearer KEY' on /v1/")
    p.add_argument("--max-batch-size", dest="max_batch_size", type=int, default=16, help="jobs decoded together")
    p.add_argument("--cache-tokens", dest="cache_tokens", type=int, default=None,
                   help="KV cache size in tokens, shared by all jobs (default: the model's context)")
    p.add_argument("--page-size", dest="page_size", type=int, default=256, help="tokens per cache page")
    p.add_argument("--max-chunk-size", dest="max_chunk_size", type=int, default=None,
                   help="prompt tokens prefilled per step (default: the config's max_input_len)")
    p.add_argument("--max-seq-len", dest="max_seq_len", type=int, default=None, help="context length per request")
    p.add_argument("--max-queue", dest="max_queue", type=int, default=64, help="waiting requests before 503")
    p.add_argument("--max-request-bytes", dest="max_request_bytes", type=_positive, default=8 * 1024 * 1024,
                   metavar="N", help="largest request body accepted; larger ones get 413 (default 8 MiB)")
    p.add_argument("--encode-special-tokens-in-content", dest="encode_special_tokens_in_content",
                   action="store_true",
                   help="parse control-token text (e.g. <|im_end|>) inside chat message contents as control tokens, "
                        "as the chat template's own markup is (default: contents are plain text, so a message "
                        "cannot forge a turn)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--model-name", dest="model_name", default=None, help="the id /v1/models reports")
    p.add_argument("--interventions-dir", dest="interventions_dir", default=None, metavar="DIR",
                   help="folder of steering files (.safetensors) that requests' `interventions` may name; without "
                        "it, requests may only send vectors inline")
    p.add_argument("--backend", default=None, choices=["auto", "torch", "cpu", "triton"],
                   help="pin one kernel backend (default: each op takes the first that accepts it)")
    add_cpu_activations_arg(p)
    p.add_argument("--deterministic", action="store_true",
                   help="batch invariance in every kernel, at any cost: a request's tokens do not depend on what "
                        "else runs beside it (the default already holds it on the CPU with the C++ kernels, packed "
                        "and dense weights alike; this adds the paths without them and the GPU's, see README)")
    p.add_argument("--dense-gguf", dest="dense_gguf", action="store_true",
                   help="dequantize a GGUF's Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/IQ4_NL/Q2_K/Q3_K/Q4_K/Q5_K/Q6_K/IQ4_XS blocks "
                        "to dense weights at load (default: kept packed)")
    p.add_argument("--replicas", type=_positive, default=None, metavar="N",
                   help="run N engine replicas as a Ray Serve app behind Ray's HTTP proxy, with prefix-aware "
                        "routing (needs the ray extra; default: one plain process, no Ray)")
    p.add_argument("--ray-address", dest="ray_address", default=None, metavar="ADDR",
                   help="with --replicas: join this Ray cluster (auto, or HEAD_IP:6379, run on one of its nodes) "
                        "instead of starting a local Ray instance")
    p.add_argument("--routing", default="prefix", choices=["prefix", "default"],
                   help="with --replicas: send requests that share a prompt prefix to the replica holding it, else "
                        "to the least loaded (prefix, the default), or use Ray Serve's power-of-two-choices")
    return p


def missing_extras() -> list[str]:
    missing = []
    for name in EXTRAS:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def run(args) -> int:
    missing = missing_extras()
    if missing:
        print(f"error: serve needs the server extra ({', '.join(missing)} not installed); install it with:\n"
              f'  pip install "exllamav2[server]"', file=sys.stderr)
        return 2
    if args.ray_address is not None and args.replicas is None:
        raise SystemExit("--ray-address needs --replicas N")
    if args.replicas is not None:
        try:
            importlib.import_module("ray.serve")
        except ImportError:
            print('error: serve --replicas needs the ray extra (ray[serve] is not installed); install it with:\n'
                  '  pip install "exllamav2[ray]"', file=sys.stderr)
            return 2
    from ..server import load_engine, run_server

    for name in ("max_batch_size", "page_size", "max_queue"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.interventions_dir is not None and not os.path.isdir(args.interventions_dir):
        raise SystemExit(f"--interventions-dir: {args.interventions_dir!r} is not a folder")
    if args.replicas is not None and args.deterministic:
        raise SystemExit("--deterministic is not passed to --replicas engines yet; serve one engine with it")
    if args.replicas is not None:
        from ..server.cluster import run as run_replicated
        return run_replicated(args)
    apply_kernel_args(args)
    if args.deterministic:
        from .. import ops
        ops.set_batch_invariant(True)
    engine = load_engine(args.model, max_batch_size=args.max_batch_size, cache_tokens=args.cache_tokens,
                         page_size=args.page_size, max_chunk_size=args.max_chunk_size, max_seq_len=args.max_seq_len,
                         dtype=args.dtype, max_queue=args.max_queue, model_name=args.model_name,
                         interventions_dir=args.interventions_dir, gguf_dequantize=args.dense_gguf,
                         max_request_bytes=args.max_request_bytes,
                         encode_special_tokens_in_content=args.encode_special_tokens_in_content)
    try:
        run_server(engine, args.host, args.port, args.api_key)
    finally:
        engine.close()
    return 0
