"""The server's engine: model, tokenizer, paged cache and the async dynamic generator, plus the mapping from
request fields to generator jobs."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from ..generator.dynamic_async import ExLlamaV2DynamicGeneratorAsync
from ..generator.sampler import ExLlamaV2Sampler


@dataclass
class ServerEngine:
    model: object
    tokenizer: object
    generator: ExLlamaV2DynamicGeneratorAsync
    model_name: str
    max_queue: int = 64
    interventions_dir: str | None = None  # the folder request interventions may read steering files from
    max_request_bytes: int = 8 * 1024 * 1024  # larger request bodies get 413
    # False: text inside message contents is never parsed as control tokens (only the chat template's markup is)
    encode_special_tokens_in_content: bool = False

    @property
    def max_seq_len(self) -> int:
        return self.generator.generator.max_seq_len

    def queue_full(self) -> bool:
        return self.generator.num_pending_jobs() >= self.max_queue

    def close(self) -> None:
        self.generator.close_sync(timeout=30)


def load_engine(model_path: str | None = None, max_batch_size: int = 16, cache_tokens: int | None = None,
                page_size: int = 256, max_chunk_size: int | None = None, max_seq_len: int | None = None,
                dtype: str | None = None, max_queue: int = 64, model_name: str | None = None,
                interventions_dir: str | None = None, gguf_dequantize: bool = False,
                max_request_bytes: int = 8 * 1024 * 1024,
                encode_special_tokens_in_content: bool = False) -> ServerEngine:
    """Load a model folder or .gguf (default: SmolLM2-135M-Instruct) and start the generator thread. Requests'
    `interventions` may name steering files only inside `interventions_dir` (none without it)."""
    if interventions_dir is not None and not os.path.isdir(interventions_dir):
        raise ValueError(f"interventions_dir: {interventions_dir!r} is not a folder")
    if max_request_bytes < 1:
        raise ValueError(f"max_request_bytes must be >= 1, got {max_request_bytes}")
    from .. import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
    from ..tokenizer import ExLlamaV2Tokenizer

    if model_path is None:
        from ..default_models import smollm2_gguf_path
        model_path = smollm2_gguf_path()
    config = ExLlamaV2Config(model_path)
    config.gguf_dequantize = gguf_dequantize
    if max_seq_len:
        config.max_seq_len = max_seq_len
    if dtype:
        config.dtype = dtype
    tokens = cache_tokens or max(config.max_seq_len, 4 * page_size)
    tokens = -(-tokens // page_size) * page_size
    # before building or loading anything: a cache that cannot fit is an error naming the setting
    from ..cache import check_cache_size
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    check_cache_size(SimpleNamespace(config=config), 1, tokens, config.resolved_dtype(device),
                     config.num_key_value_heads, [device] * config.num_hidden_layers)
    model = ExLlamaV2(config)
    model.load()
    tokenizer = ExLlamaV2Tokenizer(config)
    cache = ExLlamaV2Cache(model, batch_size=1, max_seq_len=tokens)
    generator = ExLlamaV2DynamicGeneratorAsync(model, cache, tokenizer, max_batch_size=max_batch_size,
                                               max_chunk_size=max_chunk_size, page_size=page_size)
    name = model_name or os.path.splitext(os.path.basename(os.path.normpath(model_path)))[0]
    return ServerEngine(model, tokenizer, generator, name, max_queue, interventions_dir, max_request_bytes,
                        encode_special_tokens_in_content)


def sampler_settings(req) -> ExLlamaV2Sampler.Settings:
    temperature = 1.0 if req.temperature is None else req.temperature
    if temperature < 0.01:
        s = ExLlamaV2Sampler.Settings.greedy()
    else:
        s = ExLlamaV2Sampler.Settings(temperature=temperature, top_k=0, top_p=req.top_p or 1.0,
                                      token_repetition_penalty=1.0)
    s.token_presence_penalty = req.presence_penalty or 0.0
    s.token_frequency_penalty = req.frequency_penalty or 0.0
    return s


def job_seed(req, index: int) -> int | None:
    """Choice `index`'s sampling seed: the request's own for the first (what a job of that seed gives), a hash of
    (seed, index) for the others, so that no choice of one seed repeats a choice of another (seed + index would
    make seed 5's second choice seed 6's first)."""
    if req.seed is None or index == 0:
        return req.seed
    digest = hashlib.blake2b(f"{req.seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def encode_prompt(tokenizer, text: str, special: bool) -> torch.Tensor:
    return tokenizer.encode(text, add_bos=False, encode_special_tokens=special)


def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode_list([token_id], decode_special_tokens=True)


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The bytes a token stands for, as OpenAI's logprobs `bytes` carry them: a token holding part of a multi-byte
    character gives those bytes (so a client can join them into the character), not the UTF-8 of U+FFFD that its
    decoded text shows. Byte-level BPE pieces map through the GPT-2 byte alphabet, `<0xHH>` byte-fallback pieces
    give their byte; any other token gives its text in UTF-8."""
    table = getattr(tokenizer, "_server_token_bytes", None)
    if table is None:
        table = tokenizer._server_token_bytes = _TokenBytes(tokenizer)
    return table.get(int(token_id))


class _TokenBytes:
    def __init__(self, tokenizer):
        from ..tokenizer.vocab_index import byte_level_alphabet, is_byte_level
        self.tokenizer = tokenizer
        self.cache: dict[int, bytes] = {}
        self.raw: dict[int, str] = {}
        self.alphabet: dict[str, int] = {}
        self.fallback = frozenset()
        inner = getattr(tokenizer, "tokenizer", None)
        try:
            vocab = inner.get_vocab(with_added_tokens=True)
            self.raw = {i: p for p, i in vocab.items()}
            if is_byte_level(vocab, lambda i: inner.decode([i], skip_special_tokens=False)):
                self.alphabet = byte_level_alphabet()
            self.fallback = tokenizer.get_byte_fallback_ids()
        except Exception:  # noqa: BLE001 -- a tokenizer without these views: the decoded text's bytes
            pass

    def get(self, token_id: int) -> bytes:
        hit = self.cache.get(token_id)
        if hit is not None:
            return hit
        raw = self.raw.get(token_id)
        text = token_text(self.tokenizer, token_id)
        out = None
        if raw is not None and "\ufffd" in text:
            if token_id in self.fallback and raw.startswith("<0x") and len(raw) == 6:
                out = bytes([int(raw[3:5], 16)])
            elif self.alphabet and all(ch in self.alphabet for ch in raw):
                out = bytes(self.alphabet[ch] for ch in raw)
        if out is None:
            out = text.encode("utf-8")
        self.cache[token_id] = out
        return out

