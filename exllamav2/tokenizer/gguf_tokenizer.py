"""Build a `tokenizers.Tokenizer` from the vocabulary metadata of a GGUF file.

The result matches what HF transformers builds for `AutoTokenizer.from_pretrained(dir, gguf_file=...)`:
- `tokenizer.ggml.model == "gpt2"`: byte-level BPE with the file's merges; the split regex comes from
  `tokenizer.ggml.pre` (GPT-2's own regex when the value is not one HF knows).
- `tokenizer.ggml.model == "llama"`: SentencePiece-style BPE with byte fallback. The file holds no merges,
  so they are rebuilt from the vocabulary (ranked by score, or by position for Gemma, whose scores do
  not follow merge order).
Tokens typed CONTROL become special added tokens, USER_DEFINED ones plain added tokens.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from .build_cache import cached_build
from .gguf_metadata import read_gguf_metadata

SPIECE_SPACE = "\u2581"

# llama.cpp token types (tokenizer.ggml.token_type)
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# Split regexes of the original tokenizers, keyed by llama.cpp's `tokenizer.ggml.pre` names.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS: dict[str, str] = {
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
         "jina-v5-nano", "dbrx", "smaug-bpe"],
        _LLAMA3_SPLIT,
    ),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O_SPLIT),
}

# pre-tokenizers whose words found whole in the vocabulary are taken whole before any merge (tiktoken's rule, the
# original tokenizers' `ignore_merges`): the names llama.cpp's llama-vocab.cpp sets ignore_merges for. HF's GGUF
# conversion leaves it off, which splits some words the original keeps whole (Llama 3: "Cửa Việt").
IGNORE_MERGES_PRE = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "minicpm5", "youtu", "glm4", "glm5", "tekken", "granite-embed-multi-97m"}

GEMMA_ARCHITECTURES = {"gemma", "gemma2", "gemma3", "gemma3n"}


@dataclass
class GGUFTokenizerInfo:
    """A tokenizer rebuilt from GGUF metadata, with the settings a `tokenizer_config.json` would hold."""

    tokenizer: Tokenizer
    source_path: str
    architecture: str
    tokenizer_model: str  # tokenizer.ggml.model
    pre_tokenizer: str | None  # tokenizer.ggml.pre
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    unk_token_id: int | None
    add_bos_token: bool
    add_eos_token: bool
    chat_template: str | None
    extra_token_ids: dict[str, int] = field(default_factory=dict)  # e.g. mask/sep/eot when present

    def token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tokenizer.id_to_token(token_id)


# --- vocabulary and merges -------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def merges_from_vocab(tokens: list[str], ranks: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two vocabulary
    pieces, best rank first. Ties are broken the way HF's `generate_merges` breaks them (longer left
    piece, then longer right piece, then vocabulary order), so the tokenization is identical."""
    vocab = {t: i for i, t in enumerate(tokens)}
    rank_of = dict(zip(tokens, ranks))
    candidates: list[tuple[float, int, int, str, str]] = []
    for token, rank in rank_of.items():
        local = []
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                local.append((vocab[left], vocab[right], left, right))
        local.sort()
        candidates.extend((rank, len(l), len(r), l, r) for _, _, l, r in local)
    candidates.sort(key=lambda c: (c[0], c[1], c[2]), reverse=True)
    return [(l, r) for _, _, _, l, r in candidates]


def _byte_level_tokenizer(meta: dict[str, Any], path: str) -> Tokenizer:
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {}
    for i, t in enumerate(tokens):
        key = t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))
        vocab[key] = i
    if "tokenizer.ggml.merges" not in meta:
        raise ValueError(f"{path}: byte-level GGUF vocabulary has no 'tokenizer.ggml.merges'")
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False,
                        ignore_merges=meta.get("tokenizer.ggml.pre") in IGNORE_MERGES_PRE))
    split = PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_decoder(strip_prefix_space: bool) -> decoders.Decoder:
    steps = [decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if strip_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    return decoders.Sequence(steps)


def _gemma_tokenizer(meta: dict[str, Any], path: str, rank_by_position: bool) -> Tokenizer:
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    if rank_by_position:
        # Gemma stores runs of spaces as real spaces, but looks them up as U+2581 runs.
        tokens = [SPIECE_SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
        ranks = [-float(i) for i in range(len(tokens))]
    else:
        ranks = _scores(meta, path)
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(BPE(vocab=vocab, merges=merges_from_vocab(tokens, ranks), fuse_unk=True,
                        unk_token="<unk>", dropout=None, byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", SPIECE_SPACE)
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tok.decoder = _spm_decoder(strip_prefix_space=False)
    return tok


def _llama_spm_tokenizer(meta: dict[str, Any], path: str, architecture: str) -> Tokenizer:
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(BPE(vocab=vocab, merges=merges_from_vocab(tokens, _scores(meta, path)), fuse_unk=True,
                        byte_fallback=True, dropout=None))
    # llama.cpp prepends a space unless the file says otherwise (older files carry no flag).
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    if architecture == "phi3":
        # Phi-3 prepends the marker with a normalizer, so a leading space stays a separate marker.
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPIECE_SPACE), normalizers.Replace(" ", SPIECE_SPACE)])
        tok.pre_tokenizer = None
        add_prefix = True
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement=SPIECE_SPACE, prepend_scheme="first" if add_prefix else "never", split=False
        )
    tok.decoder = _spm_decoder(strip_prefix_space=add_prefix)
    return tok


def _scores(meta: dict[str, Any], path: str) -> list[float]:
    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(meta["tokenizer.ggml.tokens"]):
        raise ValueError(f"{path}: SentencePiece GGUF vocabulary needs 'tokenizer.ggml.scores', one per token")
    return [float(s) for s in scores]


def _add_typed_tokens(tok: Tokenizer, meta: dict[str, Any], byte_level: bool) -> None:
    tokens = meta["tokenizer.ggml.tokens"]
    types = meta.get("tokenizer.ggml.token_type") or []
    alphabet = set(bytes_to_unicode().values()) if byte_level else None
    # A byte-level CONTROL token spelled outside the byte alphabet is a llama.cpp mislabel; adding it
    # would grow the vocabulary past the model's, so it is skipped (as HF does).
    control = [
        AddedToken(t, normalized=False, special=True)
        for t, ty in zip(tokens, types)
        if ty == TOKEN_TYPE_CONTROL and (alphabet is None or set(t) <= alphabet)
    ]
    if control:
        tok.add_special_tokens(control)
    vocab = tok.get_vocab(with_added_tokens=True)
    user = [
        AddedToken(t, normalized=False, special=False)
        for t, ty in zip(tokens, types)
        if ty == TOKEN_TYPE_USER_DEFINED and t in vocab
    ]
    if user:
        tok.add_tokens(user)


def _add_named_special_tokens(tok: Tokenizer, meta: dict[str, Any]) -> None:
    """BOS, EOS, UNK and PAD are special tokens whatever their type: HF registers the tokens they name as special
    (so llama.cpp's UNKNOWN-typed `<unk>` is matched whole and skipped in decoding, as in HF)."""
    tokens = meta["tokenizer.ggml.tokens"]
    added = tok.get_added_tokens_decoder()
    named = []
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        token_id = int(token_id) if token_id is not None else -1
        if not 0 <= token_id < len(tokens) or (token_id in added and added[token_id].special):
            continue
        if tok.token_to_id(tokens[token_id]) == token_id:
            named.append(AddedToken(tokens[token_id], normalized=False, special=True))
    if named:
        tok.add_special_tokens(named)


def _post_processor(tok: Tokenizer, bos: int | None, eos: int | None, add_bos: bool, add_eos: bool):
    single, pair, specials = [], [], []
    if add_bos and bos is not None:
        piece = tok.id_to_token(bos)
        single.append(f"{piece}:0")
        specials.append((piece, bos))
    single.append("$A:0")
    if add_eos and eos is not None:
        piece = tok.id_to_token(eos)
        single.append(f"{piece}:0")
        specials.append((piece, eos))
    pair = single + [s.replace("$A:0", "$B:1").replace(":0", ":1") for s in single]
    return processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair), special_tokens=list(dict.fromkeys(specials)))


def _builder_for(model: str, architecture: str, path: str) -> Callable[[dict[str, Any], str], Tokenizer]:
    if model == "gpt2":
        return _byte_level_tokenizer
    if model == "llama" and architecture in GEMMA_ARCHITECTURES:
        return lambda m, p: _gemma_tokenizer(m, p, rank_by_position=True)
    if model == "gemma4":
        return lambda m, p: _gemma_tokenizer(m, p, rank_by_position=False)
    if model == "llama":
        return lambda m, p: _llama_spm_tokenizer(m, p, architecture)
    raise ValueError(
        f"{path}: cannot build a tokenizer for tokenizer.ggml.model={model!r}; supported: 'gpt2', 'llama', 'gemma4'"
    )


def tokenizer_from_gguf(path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> GGUFTokenizerInfo:
    """Rebuild the tokenizer described by a GGUF file's metadata (pass `metadata` if already read)."""
    path = os.fspath(path)
    meta = metadata if metadata is not None else read_gguf_metadata(path)
    if "tokenizer.ggml.tokens" not in meta:
        raise ValueError(f"{path}: GGUF file has no tokenizer vocabulary ('tokenizer.ggml.tokens' missing)")
    model = meta.get("tokenizer.ggml.model")
    architecture = meta.get("general.architecture", "")
    def build() -> Tokenizer:
        tok = _builder_for(model, architecture, path)(meta, path)
        _add_typed_tokens(tok, meta, byte_level=(model == "gpt2"))
        _add_named_special_tokens(tok, meta)
        return tok

    try:
        tok = cached_build(meta, build)
    except Exception as e:  # the tokenizers library names no file ("Token 'Ġb' out of vocabulary")
        if path in str(e):
            raise
        raise ValueError(f"{path}: the GGUF tokenizer vocabulary is damaged or inconsistent "
                         f"({type(e).__name__}: {e})") from None

    def opt_id(key: str) -> int | None:
        v = meta.get(f"tokenizer.ggml.{key}")
        return int(v) if v is not None else None

    bos, eos = opt_id("bos_token_id"), opt_id("eos_token_id")
    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    if add_bos is None:
        # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise.
        add_bos = model == "llama"
    if model == "gemma4":
        add_bos = False  # its chat template writes <bos> itself
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    tok.post_processor = _post_processor(tok, bos, eos, bool(add_bos), add_eos)

    extra = {k: opt_id(f"{k}_token_id") for k in ("mask", "sep", "cls", "eot", "eom")}
    return GGUFTokenizerInfo(
        tokenizer=tok,
        source_path=path,
        architecture=architecture,
        tokenizer_model=model,
        pre_tokenizer=meta.get("tokenizer.ggml.pre"),
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=opt_id("padding_token_id"),
        unk_token_id=opt_id("unknown_token_id"),
        add_bos_token=bool(add_bos),
        add_eos_token=add_eos,
        chat_template=meta.get("tokenizer.chat_template"),
        extra_token_ids={k: v for k, v in extra.items() if v is not None},
    )


def save_hf_tokenizer_files(info: GGUFTokenizerInfo, out_dir: str | os.PathLike) -> list[str]:
    """Write `tokenizer.json` and `tokenizer_config.json` for `info` into `out_dir`; returns the paths."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tok_path = os.path.join(out_dir, "tokenizer.json")
    info.tokenizer.save(tok_path)

    added_decoder = {}
    for token_id, added in sorted(info.tokenizer.get_added_tokens_decoder().items()):
        added_decoder[str(token_id)] = {
            "content": added.content, "lstrip": added.lstrip, "normalized": added.normalized,
            "rstrip": added.rstrip, "single_word": added.single_word, "special": added.special,
        }
    config: dict[str, Any] = {
        "add_bos_token": info.add_bos_token,
        "add_eos_token": info.add_eos_token,
        "added_tokens_decoder": added_decoder,
        "bos_token": info.token(info.bos_token_id),
        "eos_token": info.token(info.eos_token_id),
        "pad_token": info.token(info.pad_token_id),
        "unk_token": info.token(info.unk_token_id),
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1000000000000000019884624838656,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if info.chat_template is not None:
        config["chat_template"] = info.chat_template
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")
    return [tok_path, cfg_path]
