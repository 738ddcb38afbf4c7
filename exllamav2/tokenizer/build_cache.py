"""Tokenizers built from large GGUF vocabularies, kept on disk. A SentencePiece vocabulary in a GGUF file has no
merges; deriving them (gguf_tokenizer.merges_from_vocab) took ~1.4 s of a ~2.3 s build for Gemma-3's 262k tokens
at every start, where the built tokenizer's JSON loads in ~0.8 s.

Cache: `$EXLLAMAV2_TOKENIZER_CACHE`, else `~/.cache/exllamav2/tokenizers`; one JSON file per hash of the metadata
the build reads (every `tokenizer.*` field and the architecture), the building code's source and the `tokenizers`
version, so a changed file, code or library rebuilds. A cache that cannot be written or read only costs the build.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import tokenizers
from tokenizers import Tokenizer

MIN_TOKENS = 50_000   # smaller vocabularies build in well under the time a cache read takes


def cache_dir() -> Path:
    env = os.environ.get("EXLLAMAV2_TOKENIZER_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "exllamav2" / "tokenizers"


def cache_key(meta: dict[str, Any]) -> str:
    h = hashlib.sha256(tokenizers.__version__.encode())
    for source in (Path(__file__).with_name("gguf_tokenizer.py"), Path(__file__)):
        h.update(source.read_bytes())
    fields = {k: v for k, v in meta.items() if k.startswith("tokenizer.") or k == "general.architecture"}
    h.update(json.dumps(fields, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


def cached_build(meta: dict[str, Any], build: Callable[[], Tokenizer]) -> Tokenizer:
    """build(), or the tokenizer it built before for the same metadata and code."""
    if len(meta["tokenizer.ggml.tokens"]) < MIN_TOKENS:
        return build()
    path = cache_dir() / f"{cache_key(meta)}.json"
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception:  # a damaged entry (a full disk mid-write, say): built and written again below
            pass
    tok = build()
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(tmp), pretty=False)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return tok
