"""ExLlamaV2Tokenizer: encode/decode, special ids, padding and chat templates over HF `tokenizers`."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Sequence

import torch

from .chat_template import ChatTemplateError, content_spans, render_chat_template, select_chat_template
from .inputs import check_texts, id_rows
from .sources import load_tokenizer_source
from .stream import ExLlamaV2TokenizerStream
from .vocab_index import (CharTrie, build_char_trie, build_id_to_ord, build_prefix_id_to_ids,
                          build_prefix_to_ids, byte_fallback_ids, is_byte_level)

# Additive mask value at pads: finite (a fully masked row must not turn into NaN) and exactly
# representable in fp16/bf16/fp32, yet far below any attention score.
PAD_MASK_VALUE = -65504.0


class ExLlamaV2Tokenizer:
    Trie = CharTrie  # the original's nested class name
    max_cached_strings = 100

    def __init__(self, config, lazy_init: bool = True, force_json: bool = False, force_spm: bool = False):
        if force_spm:
            raise ValueError("force_spm: SentencePiece tokenizer.model files are not supported; use tokenizer.json or a GGUF file")
        self.config = config
        model_dir = getattr(config, "model_dir", None)
        gguf_path = getattr(config, "gguf_path", None)
        gguf_file = getattr(config, "gguf_file", None)
        meta = gguf_file.all_metadata() if gguf_file is not None and gguf_file.path == gguf_path else None
        source = load_tokenizer_source(model_dir, gguf_path, meta)
        self.origin = source.origin
        self.tokenizer = source.tokenizer
        self.chat_templates = source.chat_templates
        self.add_bos_token_default = bool(source.add_bos_token)
        self.add_eos_token_default = bool(source.add_eos_token)

        self._encode_lock = threading.Lock()  # tokenizers' split-specials flag is shared state (_encode_lists)
        added = self.tokenizer.get_added_tokens_decoder()
        self.extended_piece_to_id: dict[str, int] = {a.content: i for i, a in added.items() if a.special}
        for piece, token_id in source.extra_special_pieces.items():
            if self.tokenizer.token_to_id(piece) == token_id:
                self.extended_piece_to_id.setdefault(piece, token_id)
        self.extended_id_to_piece = {i: p for p, i in self.extended_piece_to_id.items()}
        self.unspecial_piece_to_id: dict[str, int] = {a.content: i for i, a in added.items() if not a.special}
        self.special_ids = torch.tensor(sorted(self.extended_id_to_piece), dtype=torch.long)

        self.actual_vocab_size = max(self.tokenizer.get_vocab_size(with_added_tokens=True),
                                     max(added, default=-1) + 1)
        self.unk_token_id = self._resolve_id(None, source, "unk_token", [])
        self.bos_token_id = self._resolve_id(getattr(config, "bos_token_id", None), source, "bos_token", ["<s>", "<bos>", "<|begin_of_text|>"])
        self.eos_token_id = self._resolve_id(getattr(config, "eos_token_id", None), source, "eos_token", ["</s>", "<eos>", "<|endoftext|>", "<|end_of_text|>"])
        self.pad_token_id = self._resolve_id(getattr(config, "pad_token_id", None), source, "pad_token", ["<pad>"])
        if self.pad_token_id is None:
            self.pad_token_id = self.eos_token_id
        self.eos_token_ids = self._collect_eos_ids(source)

        self.bos_token = self._piece(self.bos_token_id)
        self.eos_token = self._piece(self.eos_token_id)
        self.pad_token = self._piece(self.pad_token_id)
        self.unk_token = self._piece(self.unk_token_id)

        self.newline_token_id = self._last_id("\n")
        self.space_token_id = self._last_id(" ")

        self._id_to_piece: list[str] | None = None
        self._id_to_piece_special: list[str] | None = None
        self._piece_to_id: dict[str, int] | None = None
        self._id_to_ord: list[int] | None = None
        self._byte_fallback_ids: frozenset[int] | None = None
        self._prefix_to_ids: dict[str, list[int]] | None = None
        self._prefix_id_to_ids: dict[int, list[int]] | None = None
        self._char_trie: CharTrie | None = None
        self._char_trie_ci: CharTrie | None = None
        self._vocab_lock = threading.RLock()  # lazy vocabulary views may be first asked for from several threads
        self.tokenized_str_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        if not lazy_init:
            self.get_id_to_piece_list(True)
            self.get_piece_to_id_dict()
            self.get_id_to_ord_list()
            self.get_prefix_to_ids_dict()
            self.get_prefix_id_to_ids_dict()
            self.get_char_trie()
            self.get_char_trie_ci()

    # --- special ids --------------------------------------------------------------------------------

    def _valid_id(self, token_id: Any) -> int | None:
        if isinstance(token_id, (list, tuple)):
            token_id = token_id[0] if token_id else None
        if token_id is None:
            return None
        token_id = int(token_id)
        return token_id if 0 <= token_id < self.actual_vocab_size else None

    def _resolve_id(self, from_config: Any, source, name: str, fallback_pieces: list[str]) -> int | None:
        """Config first, then the tokenizer files (ids from GGUF, pieces from tokenizer_config), then known pieces."""
        token_id = self._valid_id(from_config)
        if token_id is None:
            token_id = self._valid_id(source.special_ids.get(name))
        if token_id is None and source.special_tokens.get(name) is not None:
            token_id = self.tokenizer.token_to_id(source.special_tokens[name])
        for piece in fallback_pieces:
            if token_id is not None:
                break
            token_id = self.tokenizer.token_to_id(piece)
        return token_id

    def _collect_eos_ids(self, source) -> list[int]:
        candidates: list[Any] = [self.eos_token_id]
        gen_eos = (getattr(self.config, "generation_config", None) or {}).get("eos_token_id")
        candidates += gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]
        candidates.append(source.special_ids.get("eos_token"))
        if source.special_tokens.get("eos_token") is not None:
            candidates.append(self.tokenizer.token_to_id(source.special_tokens["eos_token"]))
        ids = [self._valid_id(c) for c in candidates]
        return list(dict.fromkeys(i for i in ids if i is not None))

    def _piece(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.tokenizer.id_to_token(token_id)

    def _last_id(self, text: str) -> int | None:
        ids = self._encode_one(text).ids
        return ids[-1] if ids else None

    def _encode_one(self, text: str):
        """`tokenizers`' encoding of text with special tokens recognised, under the lock that keeps another
        thread's encode from flipping the shared split-specials flag in between (_encode_lists)."""
        with self._encode_lock:
            self.tokenizer.encode_special_tokens = False
            return self.tokenizer.encode(text, add_special_tokens=False)

    # --- encoding -----------------------------------------------------------------------------------

    def _encode_lists(self, texts: list[str], add_bos: bool, add_eos: bool, encode_special_tokens: bool) -> list[list[int]]:
        # tokenizers' flag means "split special tokens as text", the inverse of ours; it is shared state, so
        # encodes from several threads (the server tokenizes off its event loop) take turns
        with self._encode_lock:
            self.tokenizer.encode_special_tokens = not encode_special_tokens
            try:
                encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
            finally:
                self.tokenizer.encode_special_tokens = False
        prefix = [self.bos_token_id] if add_bos and self.bos_token_id is not None else []
        suffix = [self.eos_token_id] if add_eos and self.eos_token_id is not None else []
        return [prefix + e.ids + suffix for e in encodings]

    def encode(
        self,
        text: str | Sequence[str],
        add_bos: bool = False,
        add_eos: bool = False,
        encode_special_tokens: bool = False,
        return_offsets: bool = False,
        embeddings: Any = None,
    ):
        """LongTensor (1, n) for a string; for a list, (b, n) left-padded with `pad_token_id`.
        With `return_offsets`, also a (b, 1) tensor of minus the pad length of each row."""
        if embeddings:
            raise NotImplementedError("encode: embeddings= (ExLlamaV2MMEmbedding text aliases) is not supported: "
                                      "this implementation has no multimodal models; pass text only")
        texts, single = check_texts(text, "encode")
        seqs = self._encode_lists(texts, add_bos, add_eos, encode_special_tokens)
        length = max((len(s) for s in seqs), default=0)
        pad = self.pad_token_id if self.pad_token_id is not None else 0
        ids = torch.full((len(seqs), length), pad, dtype=torch.long)
        for row, seq in enumerate(seqs):
            if seq:
                ids[row, length - len(seq):] = torch.tensor(seq, dtype=torch.long)
        if not return_offsets:
            return ids
        offsets = torch.tensor([[len(s) - length] for s in seqs], dtype=torch.long)
        return ids, offsets

    def num_tokens(self, text: str, encode_special_tokens: bool = False) -> int:
        if not isinstance(text, str):
            raise TypeError(f"num_tokens: expected a str, got {type(text).__name__}")
        check_texts(text, "num_tokens")
        return len(self._encode_lists([text], False, False, encode_special_tokens)[0])

    def single_id(self, piece: str) -> int | None:
        """The id of one token given as its vocabulary piece (or text that encodes to one token)."""
        if not isinstance(piece, str):
            raise TypeError(f"single_id: expected a str, got {type(piece).__name__}")
        check_texts(piece, "single_id")
        if piece in self.extended_piece_to_id:
            return self.extended_piece_to_id[piece]
        token_id = self.tokenizer.token_to_id(piece)
        if token_id is not None:
            return token_id
        ids = self._encode_one(piece).ids
        return ids[0] if len(ids) == 1 else None

    @staticmethod
    def single_token(token_id: int) -> torch.Tensor:
        return torch.tensor([[token_id]], dtype=torch.long)

    def get_vocab_size(self) -> int:
        return self.actual_vocab_size

    def padding_mask(self, ids: torch.Tensor, dtype: torch.dtype = torch.float16) -> torch.Tensor:
        """Additive attention mask, same shape as `ids`: 0, or PAD_MASK_VALUE on the left padding.
        Only the leading run of pad ids counts, so a pad id that is also EOS stays visible later on."""
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"padding_mask: expected a tensor of ids, got {type(ids).__name__}")
        if self.pad_token_id is None:
            return torch.zeros(ids.shape, dtype=dtype, device=ids.device)
        leading_pad = torch.cumprod((ids == self.pad_token_id).to(torch.int32), dim=-1).bool()
        mask = torch.zeros(ids.shape, dtype=dtype, device=ids.device)
        return mask.masked_fill_(leading_pad, PAD_MASK_VALUE)

    # --- decoding -----------------------------------------------------------------------------------

    def decode_list(self, ids: list[int], decode_special_tokens: bool = False) -> str:
        rows, batched = id_rows(ids, "decode_list")
        if batched:
            raise TypeError("decode_list: expected one sequence of ids, got rows of ids (use decode)")
        return self._decode_many(rows, decode_special_tokens, strip_left_pad=False)[0]

    def _decode_many(self, seqs: list[list[int]], decode_special_tokens: bool, strip_left_pad: bool) -> list[str]:
        cleaned = []
        for seq in seqs:
            if strip_left_pad and self.pad_token_id is not None:
                start = 0
                while start < len(seq) and seq[start] == self.pad_token_id:
                    start += 1
                seq = seq[start:]
            if decode_special_tokens:
                seq = [i for i in seq if 0 <= i < self.actual_vocab_size]
            else:
                seq = [i for i in seq if 0 <= i < self.actual_vocab_size and i != self.pad_token_id]
            cleaned.append(seq)
        return self.tokenizer.decode_batch(cleaned, skip_special_tokens=not decode_special_tokens)

    def byte_fallback_flags(self, ids: list[int], decode_special_tokens: bool = False) -> list[bool | None]:
        """Per id: True for a byte-fallback token (see vocab_index.byte_fallback_ids), False for any other token the
        decoder sees, None for one that decoding drops (outside the vocabulary; specials and padding unless
        decode_special_tokens)."""
        byte_ids = self.get_byte_fallback_ids()
        out: list[bool | None] = []
        for i in ids:
            if not 0 <= i < self.actual_vocab_size or (
                    not decode_special_tokens and (i == self.pad_token_id or i in self.extended_id_to_piece)):
                out.append(None)
            else:
                out.append(i in byte_ids)
        return out

    def decode(self, ids, decode_special_tokens: bool = False):
        """str for one sequence of ids (an int, a 1-D tensor or a list); list[str] for a batch (a 2-D tensor or a
        list of rows), whose rows lose their left padding. Ids outside the vocabulary are dropped (as HF does for
        ids past its end: a model's padded embedding rows have no text)."""
        rows, batched = id_rows(ids, "decode")
        if batched:
            return self._decode_many(rows, decode_special_tokens, strip_left_pad=True)
        return self._decode_many(rows, decode_special_tokens, strip_left_pad=False)[0]

    def stream(self, decode_special_tokens: bool = False) -> ExLlamaV2TokenizerStream:
        """A fresh incremental decoder over this tokenizer."""
        return ExLlamaV2TokenizerStream(self, decode_special_tokens)

    # --- vocabulary views ---------------------------------------------------------------------------

    def get_id_to_piece_list(self, include_special_tokens: bool = False) -> list[str]:
        """The text each id decodes to in context (leading spaces kept); specials are '' unless included."""
        cached = self._id_to_piece_special if include_special_tokens else self._id_to_piece
        if cached is not None:
            return cached
        # Decode each token behind a plain anchor token and cut the anchor off: a token decoded alone
        # would lose the leading space that SentencePiece decoders strip at the start of a text.
        anchor = self._encode_one("a").ids[:1]
        anchor_text = self.tokenizer.decode(anchor)
        pieces = self.tokenizer.decode_batch([anchor + [i] for i in range(self.actual_vocab_size)],
                                             skip_special_tokens=False)
        pieces = [p[len(anchor_text):] for p in pieces]
        if include_special_tokens:
            self._id_to_piece_special = pieces
        else:
            for i in self.extended_id_to_piece:
                pieces[i] = ""
            self._id_to_piece = pieces
        return pieces

    def get_piece_to_id_dict(self) -> dict[str, int]:
        if self._piece_to_id is None:
            self._piece_to_id = {p: i for i, p in enumerate(self.get_id_to_piece_list(False)) if p}
        return self._piece_to_id

    def get_id_to_ord_list(self) -> list[int]:
        """Per id, the single byte (0..255) the token stands for, or -1 (see vocab_index.build_id_to_ord)."""
        with self._vocab_lock:
            if self._id_to_ord is None:
                vocab = self.tokenizer.get_vocab(with_added_tokens=True)
                raw: list[str | None] = [None] * self.actual_vocab_size
                for piece, i in vocab.items():
                    if 0 <= i < self.actual_vocab_size:
                        raw[i] = piece
                byte_level = is_byte_level(vocab, lambda i: self.tokenizer.decode([i], skip_special_tokens=False))
                self._id_to_ord = build_id_to_ord(raw, self.get_id_to_piece_list(False), byte_level)
            return self._id_to_ord

    def get_byte_fallback_ids(self) -> frozenset[int]:
        with self._vocab_lock:
            if self._byte_fallback_ids is None:
                self._byte_fallback_ids = byte_fallback_ids(self.tokenizer.token_to_id,
                                                            lambda i: self.tokenizer.decode([i]))
            return self._byte_fallback_ids

    def get_prefix_to_ids_dict(self) -> dict[str, list[int]]:
        """Each distinct (non-special) piece -> ascending ids of all tokens whose piece starts with it."""
        with self._vocab_lock:
            if self._prefix_to_ids is None:
                self._prefix_to_ids = build_prefix_to_ids(self.get_id_to_piece_list(False))
            return self._prefix_to_ids

    def get_prefix_id_to_ids_dict(self) -> dict[int, list[int]]:
        """Each id -> ids of all tokens whose piece starts with its piece ([id] for special/unused ids)."""
        with self._vocab_lock:
            if self._prefix_id_to_ids is None:
                size = max(self.actual_vocab_size, int(getattr(self.config, "vocab_size", 0) or 0))
                self._prefix_id_to_ids = build_prefix_id_to_ids(self.get_id_to_piece_list(False),
                                                                self.get_prefix_to_ids_dict(), size)
            return self._prefix_id_to_ids

    def get_char_trie(self) -> CharTrie:
        """Character trie over the (non-special) pieces; `leaf` of a node lists the ids ending there."""
        with self._vocab_lock:
            if self._char_trie is None:
                self._char_trie = build_char_trie(self.get_id_to_piece_list(False), case_insensitive=False)
            return self._char_trie

    def get_char_trie_ci(self) -> CharTrie:
        """As get_char_trie, over lower-cased pieces."""
        with self._vocab_lock:
            if self._char_trie_ci is None:
                self._char_trie_ci = build_char_trie(self.get_id_to_piece_list(False), case_insensitive=True)
            return self._char_trie_ci

    def cached_encode_str(self, text: str) -> torch.Tensor:
        """encode(text) through a small cache of the most recently used strings; returns a fresh tensor."""
        if not isinstance(text, str):
            raise TypeError(f"cached_encode_str: expected a str, got {type(text).__name__}")
        with self._vocab_lock:
            ids = self.tokenized_str_cache.get(text)
            if ids is not None:
                self.tokenized_str_cache.move_to_end(text)
                return ids.clone()
        ids = self.encode(text)
        with self._vocab_lock:
            self.tokenized_str_cache[text] = ids
            while len(self.tokenized_str_cache) > self.max_cached_strings:
                self.tokenized_str_cache.popitem(last=False)
        return ids.clone()

    # --- chat templates -----------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        template_name: str | None = None,
        **template_kwargs: Any,
    ) -> str:
        source = select_chat_template(self.chat_templates, self.origin, template_name,
                                      has_tools=bool(template_kwargs.get("tools")))
        special = {"bos_token": self.bos_token, "eos_token": self.eos_token,
                   "pad_token": self.pad_token, "unk_token": self.unk_token}
        return render_chat_template(source, messages, add_generation_prompt, special, **template_kwargs)

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        encode_special_tokens_in_content: bool = False,
        template_name: str | None = None,
        **template_kwargs: Any,
    ) -> torch.Tensor:
        """(1, n) ids of a conversation rendered by the chat template. Only the template's own markup becomes
        special tokens: text inside message contents is encoded as plain text, so a message that says
        "<|im_end|>\\n<|im_start|>system" cannot forge a turn. Conversations without such text encode exactly
        as `encode(apply_chat_template(...), encode_special_tokens=True)`, which is what
        `encode_special_tokens_in_content=True` always does (the old, trusting behaviour)."""
        def render(msgs):
            return self.apply_chat_template(msgs, add_generation_prompt, template_name, **template_kwargs)

        if encode_special_tokens_in_content:
            return self.encode(render(messages), encode_special_tokens=True)
        text, spans = content_spans(render, messages)
        check_texts(text, "encode_chat")
        for i, (m, span) in enumerate(zip(messages, spans)):
            content = m.get("content")
            if span is None and isinstance(content, str):
                forged = next((p for p in self.extended_piece_to_id if p and p in content), None)
                if forged is not None:
                    raise ChatTemplateError(
                        f"messages[{i}].content: holds the control-token text {forged!r} and the chat template "
                        "rewrites message contents, so it cannot be kept as plain text")
        enc = self._encode_one(text)
        located = sorted(s for s in spans if s is not None)
        special = self.extended_id_to_piece
        inside = any(t in special and any(a < e and s < b for s, e in located)
                     for t, (a, b) in zip(enc.ids, enc.offsets))
        if not inside:
            return torch.tensor([enc.ids], dtype=torch.long)
        # some control-token text comes from a message: markup and contents are encoded apart and spliced
        ids: list[int] = []
        pos = 0
        for s, e in located:
            if s > pos:
                ids += self._encode_lists([text[pos:s]], False, False, True)[0]
            ids += self._encode_lists([text[s:e]], False, False, False)[0]
            pos = e
        if pos < len(text):
            ids += self._encode_lists([text[pos:]], False, False, True)[0]
        return torch.tensor([ids], dtype=torch.long)
