"""
ExLlamaV2GrammarFilter: a grammar (JSON schema, JSON object, regex, Lark or EBNF) as an ExLlamaV2 filter, so the
base, streaming and dynamic generators all honour it (they call begin / feed; the sampler in
`generator/sampler.py` asks `mask_logits`).

The mask for the next token is built off the critical path: `feed(token)` hands the matcher to a worker thread,
which computes the next bitmask while the generator runs the forward (llguidance releases the GIL for it). The
sampler then only waits for that result (normally already there), copies the packed bitmask to the logits' device
and unpacks it there.
"""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from ..filters import ExLlamaV2Filter
from .compiler import GrammarCache, GrammarError, default_cache, vocab_size_of

_pool: ThreadPoolExecutor | None = None


def _worker_pool() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=max(1, min(4, (os.cpu_count() or 2) // 2)),
                                   thread_name_prefix="exllamav2-grammar")
    return _pool


_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}


def unpack_bitmask(bitmask: torch.Tensor, vocab: int, device: torch.device) -> torch.Tensor:
    """(words,) int32 bitmask (bit j of word i allows id 32*i + j) -> (vocab,) bool on `device`."""
    shifts = _BIT_SHIFTS.get(device)
    if shifts is None:
        shifts = _BIT_SHIFTS[device] = torch.arange(32, dtype=torch.int32, device=device)
    words = bitmask.to(device, non_blocking=True)
    bits = ((words.unsqueeze(-1) >> shifts) & 1).bool().flatten()
    if bits.shape[0] >= vocab:
        return bits[:vocab]
    return torch.cat([bits, torch.zeros(vocab - bits.shape[0], dtype=torch.bool, device=device)])


class ExLlamaV2GrammarFilter(ExLlamaV2Filter):
    """
    Constrain generation to a grammar. `kind` is one of json_schema, json_object, regex, lark, ebnf and `spec`
    the schema (dict or JSON text) or grammar text; the grammar is compiled at construction (or taken from
    `cache`), so a bad one raises GrammarError (a ValueError) here, naming the problem.

    The generated text must match from its first token. The filter is finished (`is_finished()`) when the grammar
    allows nothing more; EOS is allowed exactly when the grammar accepts the text so far, and sampling it ends the
    constrained text as the filter's end token.
    """

    allow_return_type_list = False

    def __init__(self, model, tokenizer, kind: str, spec: Any = None, cache: GrammarCache | None = None):
        super().__init__(model, tokenizer)
        self.kind = kind
        self.spec = spec
        self.vocab_size = vocab_size_of(model, tokenizer)
        self.cache = cache if cache is not None else default_cache
        self.matcher = self.cache.matcher(tokenizer, self.vocab_size, kind, spec)
        self.eos_ids = set(tokenizer.eos_token_ids or [tokenizer.eos_token_id])
        self.words = (self.vocab_size + 31) // 32
        self._pending: Future | None = None
        self._bitmask: torch.Tensor | None = None
        self._fed = 0
        self._stopped = self._accepting = False
        self._error = ""

    def clone(self, c=None):
        self.background_drop()
        c = super().clone(c)
        c.matcher = self.matcher.deep_copy()
        c._pending = None
        c._bitmask = None
        return c

    # -------------------------------------------------------------- the filter protocol

    def begin(self, prefix_str: str = ""):
        self.background_drop()
        self.matcher.reset()
        self._fed = 0
        self.sequence_str = ""
        self._start_mask()

    def feed(self, token: int):
        self.background_drop()
        token = int(token)
        self._fed += 1
        if self._stopped and token in self.eos_ids:
            return  # EOS after the grammar finished: nothing left to constrain
        if not self.matcher.consume_token(token):
            self._error = self.matcher.get_error().strip() or f"token {token} is not allowed here"
            self._bitmask = None
            return  # the error is reported when the next mask is asked for
        self._start_mask()

    def ends_with(self, token: int) -> bool:
        """Whether `token` completes the constrained text: it is EOS where the grammar accepts, or after it the
        grammar allows nothing more. The sampler asks this, so every generator ends a constrained job at its last
        token without a forward for EOS. The matcher is left as it was."""
        self.background_drop()
        token = int(token)
        if token in self.eos_ids:
            return (self._accepting or self._stopped) and not self._error
        if self._error or self.matcher.try_consume_tokens([token]) != 1:
            return False
        stopped = self.matcher.is_stopped()
        self.matcher.rollback(1)
        return stopped

    def is_finished(self) -> bool:
        """The grammar allows no token but EOS: the constrained text is complete."""
        return self._stopped and not self._error

    def is_accepting(self) -> bool:
        return self._accepting

    def use_background_worker(self) -> bool:
        return True

    def background_drop(self):
        if self._pending is not None:
            try:
                self._pending.result()
            finally:
                self._pending = None

    def can_mask_logits(self) -> bool:
        return True

    def prepare_logit_mask(self) -> bool:
        """Make sure the next mask is being computed (it normally is, since feed/begin)."""
        if self._pending is None and self._bitmask is None:
            self._start_mask()
        return True

    def next_bitmask(self) -> torch.Tensor:
        """(words,) int32 bitmask of the ids allowed next (waits for the worker)."""
        self.prepare_logit_mask()
        self.background_drop()
        if self._error:
            raise GrammarError(f"grammar filter ({self.kind}): the grammar cannot go on after {self._fed} tokens: "
                               f"{self._error[:500]}")
        return self._bitmask

    def allowed_mask(self, vocab: int, device) -> torch.Tensor:
        """(vocab,) bool on `device`: the ids the grammar allows next."""
        return unpack_bitmask(self.next_bitmask(), vocab, torch.device(device))

    def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` (..., vocab) with every id the grammar forbids set to -inf, on the logits' device."""
        allowed = self.allowed_mask(logits.shape[-1], logits.device)
        return logits.masked_fill(~allowed, float("-inf"))

    def end_token_ids(self) -> set[int]:
        """Ids that end the constrained text when sampled: EOS, where the grammar accepts."""
        return set(self.eos_ids) if self._accepting else set()

    def next(self):
        """The original's set interface: (ids allowed next, ids that end the constrained text)."""
        allowed = self.allowed_mask(self.vocab_size, "cpu").nonzero().flatten().tolist()
        return set(allowed), self.end_token_ids()

    # -------------------------------------------------------------- the worker

    def _start_mask(self):
        # the matcher's state is read here, in the caller's thread: the worker owns the matcher until it is done
        self._bitmask = None
        self._stopped = self.matcher.is_stopped()
        self._accepting = self.matcher.is_accepting()
        self._error = self.matcher.get_error().strip() if self.matcher.is_error() else ""
        bitmask = torch.empty(self.words, dtype=torch.int32, pin_memory=torch.cuda.is_available())
        matcher = self.matcher

        def compute():
            matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * 4)
            if matcher.is_error():
                # the grammar has no way on (e.g. a schema with no finite instance, a parser grown too complex):
                # llguidance then allows only EOS, which must not pass as a finished text
                self._error = matcher.get_error().strip() or "the grammar cannot go on"
            self._bitmask = bitmask

        self._pending = _worker_pool().submit(compute)


class ExLlamaV2JsonSchemaFilter(ExLlamaV2GrammarFilter):
    """JSON text valid against `schema` (a dict or JSON text)."""

    def __init__(self, model, tokenizer, schema, cache: GrammarCache | None = None):
        super().__init__(model, tokenizer, "json_schema", schema, cache)


class ExLlamaV2JsonObjectFilter(ExLlamaV2GrammarFilter):
    """Any JSON object."""

    def __init__(self, model, tokenizer, cache: GrammarCache | None = None):
        super().__init__(model, tokenizer, "json_object", None, cache)


class ExLlamaV2RegexFilter(ExLlamaV2GrammarFilter):
    """Text matching `pattern` in full (Rust `regex` syntax: no look-around or back-references)."""

    def __init__(self, model, tokenizer, pattern: str, cache: GrammarCache | None = None):
        super().__init__(model, tokenizer, "regex", pattern, cache)


class ExLlamaV2LarkFilter(ExLlamaV2GrammarFilter):
    """Text in the language of a Lark grammar (llguidance's dialect: `start:` rule, `%json{...}` allowed)."""

    def __init__(self, model, tokenizer, grammar: str, cache: GrammarCache | None = None):
        super().__init__(model, tokenizer, "lark", grammar, cache)


class ExLlamaV2EbnfFilter(ExLlamaV2GrammarFilter):
    """Text in the language of a GBNF grammar (llama.cpp's EBNF: `root ::= ...`)."""

    def __init__(self, model, tokenizer, grammar: str, cache: GrammarCache | None = None):
        super().__init__(model, tokenizer, "ebnf", grammar, cache)
