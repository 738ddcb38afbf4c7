"""
Grammars compiled by llguidance (https://github.com/guidance-ai/llguidance) against an ExLlamaV2Tokenizer.

Why llguidance and not xgrammar (both measured on SmolLM2-135M's 49152-token vocabulary, `bench/bench_grammar.py
--backends` reruns the comparison; one CPU thread, a loaded machine):
- a typical nested schema compiles in ~1 ms (xgrammar ~6-9 ms); masks take ~0.03-0.06 ms per token on average
  (xgrammar ~0.005-0.07 ms). Both are far below a decode step (~10 ms on the CPU), and the mask is built in a
  worker thread beside the forward anyway (see filter.py), so mask speed did not decide it.
- it refuses what it cannot enforce: an unknown `format`, an unsatisfiable range or an unsupported regex feature is
  an error naming the problem, where xgrammar compiles e.g. `{"type": "string", "format": "hostname-weird"}` and
  silently leaves the format unenforced. Refusing instead of ignoring is what the server promises its clients.
- `is_stopped()` says when the grammar allows nothing but EOS, so a constrained job ends at its last token
  without spending a forward on the EOS token.
- it takes the `tokenizers` JSON directly (no transformers at run time), and Lark grammars with embedded
  `%json{...}` schemas and regex lexemes, plus GBNF through its converter.

Compiling makes a pristine matcher; every filter gets a deep copy, so one schema is compiled once (LRU-bounded).
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

GRAMMAR_KINDS = ("json_schema", "json_object", "regex", "lark", "ebnf")

# Separators a model writes unprompted: `{"a": 1, "b": 2}`. No other whitespace, so a model cannot stall in
# endless blanks and the grammar ends at the closing brace.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A schema, regex or grammar the constraint library cannot enforce; the message says what is wrong."""


def _llguidance():
    try:
        import llguidance
    except ImportError as e:
        raise ImportError('grammar-constrained decoding needs llguidance: pip install "exllamav2[grammar]"') from e
    return llguidance


class _TokenizerAdapter:
    """One llguidance tokenizer per ExLlamaV2Tokenizer (building it takes ~0.2 s)."""

    _lock = threading.Lock()
    _by_tokenizer: "dict[int, tuple[Any, Any]]" = {}

    @classmethod
    def get(cls, tokenizer, vocab_size: int):
        key = id(tokenizer)
        with cls._lock:
            hit = cls._by_tokenizer.get(key)
            if hit is not None and hit[0] is tokenizer and hit[1].vocab_size == vocab_size:
                return hit[1]
            llg = _llguidance()
            eos = list(tokenizer.eos_token_ids or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None
                                                   else []))
            if not eos:
                raise GrammarError("grammar filters need a tokenizer with an EOS token (none found)")
            inner = getattr(tokenizer, "tokenizer", None)
            if inner is None or not hasattr(inner, "to_str"):
                raise GrammarError("grammar filters need an ExLlamaV2Tokenizer over a `tokenizers` tokenizer")
            llt = llg.LLTokenizer(inner.to_str(), n_vocab=vocab_size, eos_token=eos)
            cls._by_tokenizer[key] = (tokenizer, llt)
            return llt


def vocab_size_of(model, tokenizer) -> int:
    """The width of the logits the mask must cover: the model's vocabulary, or the tokenizer's without a model."""
    size = int(getattr(tokenizer, "actual_vocab_size", 0) or tokenizer.get_vocab_size())
    config = getattr(model, "config", None)
    return max(size, int(getattr(config, "vocab_size", 0) or 0))


def grammar_text(kind: str, spec: Any) -> str:
    """The llguidance grammar for one constraint. `spec`: a JSON schema (dict or JSON text) for json_schema, ignored
    for json_object, a regex, a Lark grammar, or a GBNF/EBNF grammar (llama.cpp syntax)."""
    llg = _llguidance()
    M = llg.LLMatcher
    if kind == "json_schema":
        if isinstance(spec, str):
            try:
                spec = json.loads(spec)
            except json.JSONDecodeError as e:
                raise GrammarError(f"the JSON schema is not valid JSON: {e}") from None
        if isinstance(spec, bool):
            spec = {} if spec else {"not": {}}
        if not isinstance(spec, dict):
            raise GrammarError(f"a JSON schema must be an object, got {type(spec).__name__}")
        try:
            return M.grammar_from_json_schema(spec, defaults=JSON_OPTIONS)
        except (ValueError, TypeError, OverflowError) as e:  # e.g. an integer too large for a JSON number
            raise GrammarError(f"the JSON schema cannot be read: {e}") from None
    if kind == "json_object":
        return M.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if not isinstance(spec, str) or not spec:
        raise GrammarError(f"a {kind} constraint must be a non-empty string, got {spec!r}")
    try:
        if kind == "regex":
            return M.grammar_from_regex(spec)
        if kind == "lark":
            return M.grammar_from_lark(spec)
    except (ValueError, TypeError) as e:
        raise GrammarError(f"{_describe(kind)} cannot be read: {e}") from None
    if kind == "ebnf":
        try:
            return llg.grammar_from("gbnf", spec)
        except ValueError as e:
            raise GrammarError(f"the EBNF grammar cannot be read: {e}") from None
    raise GrammarError(f"unknown grammar kind {kind!r}; expected one of {GRAMMAR_KINDS}")


class GrammarCache:
    """Compiled grammars as pristine matchers, keyed by (tokenizer, vocabulary, kind, text), least recently used
    dropped past `capacity`. Thread-safe; compiling happens outside the lock."""

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.compiled = 0  # how many grammars were compiled (not served from the cache)

    def matcher(self, tokenizer, vocab_size: int, kind: str, spec: Any):
        """A fresh matcher (deep copy of the cached one) at the grammar's start."""
        text = grammar_text(kind, spec)
        key = (id(tokenizer), vocab_size, text)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit.deep_copy()
        llt = _TokenizerAdapter.get(tokenizer, vocab_size)
        llg = _llguidance()
        error = llg.LLMatcher.validate_grammar(text, llt)
        if error:
            raise GrammarError(f"{_describe(kind)} cannot be enforced: {error.strip()}")
        matcher = llg.LLMatcher(llt, text, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"{_describe(kind)} cannot be enforced: {matcher.get_error().strip()}")
        # the first mask, on a copy: a grammar with no way to start (a schema such as {"$ref": "#"} that no
        # finite text satisfies) only shows its error once a mask is computed, and would allow nothing but EOS
        probe = matcher.deep_copy()
        probe.compute_bitmask()
        if probe.is_error() or (not probe.is_accepting() and probe.is_stopped()):
            why = probe.get_error().strip() if probe.is_error() else "it allows no text"
            raise GrammarError(f"{_describe(kind)} cannot be enforced: no text satisfies it ({why.splitlines()[0]})")
        with self._lock:
            self.compiled += 1
            self._items[key] = matcher
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return matcher.deep_copy()

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def _describe(kind: str) -> str:
    return {"json_schema": "the JSON schema", "json_object": "the JSON object grammar", "regex": "the regex",
            "lark": "the Lark grammar", "ebnf": "the EBNF grammar"}.get(kind, kind)


default_cache = GrammarCache()
