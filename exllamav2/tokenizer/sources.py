"""Find and read a model's tokenizer: a `tokenizer.json` folder, or the vocabulary inside a GGUF file."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from tokenizers import Tokenizer

from .chat_template import normalize_chat_templates
from .gguf_tokenizer import tokenizer_from_gguf


@dataclass
class TokenizerSource:
    """Everything ExLlamaV2Tokenizer needs from the files, before config overrides."""

    tokenizer: Tokenizer
    origin: str  # the file or folder it came from, for messages
    special_tokens: dict[str, str | None]  # bos_token, eos_token, pad_token, unk_token, ... as pieces
    special_ids: dict[str, int | None]  # the same, as ids where the source gives ids (GGUF)
    add_bos_token: bool | None
    add_eos_token: bool | None
    chat_templates: str | dict[str, str] | None
    extra_special_pieces: dict[str, int] = field(default_factory=dict)  # from added_tokens.json / added_tokens_decoder


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _piece(value: Any) -> str | None:
    """A special token as tokenizer_config.json / special_tokens_map.json write it: a string or {content: ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _post_processor_adds(tokenizer: Tokenizer) -> tuple[bool, bool]:
    """(adds BOS, adds EOS): whether tokenizer.json's post-processor puts tokens before / after the text. HF follows
    it when tokenizer_config.json does not say add_bos_token / add_eos_token."""
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a", add_special_tokens=True).ids
    if not plain or len(full) == len(plain):
        return False, False
    at = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), None)
    if at is None:
        return False, False
    return at > 0, at + len(plain) < len(full)


def load_from_folder(model_dir: str) -> TokenizerSource:
    tok_path = os.path.join(model_dir, "tokenizer.json")
    try:
        tokenizer = Tokenizer.from_file(tok_path)
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        raise ValueError(f"{tok_path}: cannot be loaded by the tokenizers library ({e})") from e

    cfg_path = os.path.join(model_dir, "tokenizer_config.json")
    cfg = _read_json(cfg_path) if os.path.isfile(cfg_path) else {}
    map_path = os.path.join(model_dir, "special_tokens_map.json")
    token_map = _read_json(map_path) if os.path.isfile(map_path) else {}

    special_tokens = {}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        special_tokens[name] = _piece(cfg.get(name)) or _piece(token_map.get(name))

    extra: dict[str, int] = {}
    added_path = os.path.join(model_dir, "added_tokens.json")
    if os.path.isfile(added_path):
        for piece, token_id in _read_json(added_path).items():
            if isinstance(token_id, int):
                extra[piece] = token_id
    for token_id, entry in (cfg.get("added_tokens_decoder") or {}).items():
        if isinstance(entry, dict) and entry.get("special") and isinstance(entry.get("content"), str):
            extra[entry["content"]] = int(token_id)

    templates = normalize_chat_templates(cfg.get("chat_template"), cfg_path)
    jinja_path = os.path.join(model_dir, "chat_template.jinja")
    json_template_path = os.path.join(model_dir, "chat_template.json")
    if templates is None and os.path.isfile(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            templates = f.read()
    if templates is None and os.path.isfile(json_template_path):
        templates = normalize_chat_templates(_read_json(json_template_path).get("chat_template"), json_template_path)

    adds_bos, adds_eos = _post_processor_adds(tokenizer)
    return TokenizerSource(
        tokenizer=tokenizer,
        origin=model_dir,
        special_tokens=special_tokens,
        special_ids={},
        add_bos_token=adds_bos if cfg.get("add_bos_token") is None else cfg["add_bos_token"],
        add_eos_token=adds_eos if cfg.get("add_eos_token") is None else cfg["add_eos_token"],
        chat_templates=templates,
        extra_special_pieces=extra,
    )


def load_from_gguf(gguf_path: str, metadata: dict | None = None) -> TokenizerSource:
    info = tokenizer_from_gguf(gguf_path, metadata)
    ids = {"bos_token": info.bos_token_id, "eos_token": info.eos_token_id,
           "pad_token": info.pad_token_id, "unk_token": info.unk_token_id}
    return TokenizerSource(
        tokenizer=info.tokenizer,
        origin=gguf_path,
        special_tokens={name: info.token(i) for name, i in ids.items()},
        special_ids=ids,
        add_bos_token=info.add_bos_token,
        add_eos_token=info.add_eos_token,
        chat_templates=info.chat_template,
    )


def load_tokenizer_source(model_dir: str | None, gguf_path: str | None,
                          gguf_metadata: dict | None = None) -> TokenizerSource:
    """`tokenizer.json` in `model_dir` wins; otherwise the GGUF file's vocabulary (from `gguf_metadata` when the
    caller has read the header already)."""
    if model_dir and os.path.isfile(os.path.join(model_dir, "tokenizer.json")):
        return load_from_folder(model_dir)
    if gguf_path:
        if not os.path.isfile(gguf_path):
            raise FileNotFoundError(f"{gguf_path}: GGUF file not found")
        return load_from_gguf(gguf_path, gguf_metadata)
    raise FileNotFoundError(
        f"{model_dir}: no tokenizer.json in the model folder and no GGUF file to read a vocabulary from "
        "(SentencePiece tokenizer.model alone is not supported)"
    )
