"""
Constraints on generation. Before each token the sampler asks every filter for `next()`: the set of ids that may
come next (None: no constraint) and the set of ids that would end the constrained text. After a token is chosen,
the generator `feed()`s it to every filter.
"""
from __future__ import annotations

from bisect import bisect_left
from functools import lru_cache


class ExLlamaV2Filter:
    """Base class. `model` is kept for compatibility with the original constructors and may be None."""

    allow_return_type_list: bool = True

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.sequence_str = ""

    def clone(self, c=None):
        if c is None:
            c = self.__class__.__new__(self.__class__)
        c.__dict__.update(self.__dict__)
        return c

    def begin(self, prefix_str: str = ""):
        raise NotImplementedError

    def feed(self, token: int):
        raise NotImplementedError

    def next(self) -> tuple[set[int] | None, set[int] | None]:
        raise NotImplementedError

    def get_next(self) -> tuple[set[int] | None, set[int] | None]:
        return self.next()

    def can_mask_logits(self) -> bool:
        """Filters here answer with token sets; none of them masks logits directly."""
        return False

    def use_background_worker(self) -> bool:
        return False

    def background_drop(self):
        pass

    def _piece(self, token: int) -> str:
        return _pieces(self.tokenizer)[token]


@lru_cache(maxsize=10)
def _pieces(tokenizer) -> tuple[str, ...]:
    return tuple(tokenizer.get_id_to_piece_list(False))


class _PieceIndex:
    """Token pieces indexed for prefix questions; with `lower`, over lower-cased pieces."""

    def __init__(self, pieces: tuple[str, ...], lower: bool):
        keyed = [(p.lower() if lower else p, i) for i, p in enumerate(pieces) if p]
        keyed.sort()
        self.keys = [k for k, _ in keyed]
        self.ids = [i for _, i in keyed]
        self.by_piece: dict[str, list[int]] = {}
        for k, i in keyed:
            self.by_piece.setdefault(k, []).append(i)

    def extending(self, s: str) -> set[int]:
        """Ids whose piece starts with s."""
        lo = bisect_left(self.keys, s)
        hi = bisect_left(self.keys, s + "\U0010ffff", lo)
        return set(self.ids[lo:hi])

    def prefixing(self, s: str) -> set[int]:
        """Ids whose (non-empty) piece is a prefix of s."""
        out: set[int] = set()
        for length in range(1, len(s) + 1):
            out.update(self.by_piece.get(s[:length], ()))
        return out

    def exactly(self, s: str) -> set[int]:
        return set(self.by_piece.get(s, ()))


@lru_cache(maxsize=20)
def _index(tokenizer, lower: bool) -> _PieceIndex:
    return _PieceIndex(_pieces(tokenizer), lower)


class ExLlamaV2PrefixFilter(ExLlamaV2Filter):
    """
    Force the generated text to start with one of `prefix_strings`. Once the text covers the shortest prefix
    still possible, the filter stops constraining. Tokens may run past the end of a prefix.
    """

    def __init__(self, model, tokenizer, prefix_strings: str | list[str]):
        super().__init__(model, tokenizer)
        self.prefix_strings = prefix_strings if isinstance(prefix_strings, list) else [prefix_strings]
        if not self.prefix_strings or not all(isinstance(s, str) for s in self.prefix_strings):
            raise ValueError(f"ExLlamaV2PrefixFilter: prefix_strings must be a string or a non-empty list of strings, "
                             f"got {prefix_strings!r}")
        self.current_prefixes: set[str] = set()
        self.current_str = ""

    def begin(self, prefix_str: str = ""):
        self.current_prefixes = set(self.prefix_strings)
        self.current_str = ""

    def feed(self, token: int):
        self.current_str += self._piece(token)
        self.current_prefixes = {p for p in self.current_prefixes if p[:len(self.current_str)] == self.current_str}

    def next(self):
        shortest = min((len(p) for p in self.current_prefixes), default=0)
        if len(self.current_str) >= shortest:
            return None, set()
        index = _index(self.tokenizer, False)
        pass_tokens: set[int] = set()
        for prefix in self.current_prefixes:
            rest = prefix[len(self.current_str):]
            pass_tokens |= index.extending(rest) | index.prefixing(rest)
        return pass_tokens, set()


class ExLlamaV2SelectFilter(ExLlamaV2Filter):
    """
    Constrain the generated text (after `prefix_str` given to begin()) to exactly one of `options`. Tokens that
    complete an option are end tokens. With case_insensitive the options match in any case; the prefix does not.
    """

    def __init__(self, model, tokenizer, options: list[str], case_insensitive: bool = False):
        super().__init__(model, tokenizer)
        if not options or not all(isinstance(o, str) and o for o in options):
            raise ValueError(f"ExLlamaV2SelectFilter: options must be a non-empty list of non-empty strings, "
                             f"got {options!r}")
        self.case_insensitive = case_insensitive
        self.options = [o.lower() for o in options] if case_insensitive else list(options)
        self.prefix = ""
        self.offset = 0
        self.sequence_str_cmp = ""

    def begin(self, prefix_str: str = ""):
        self.sequence_str = ""
        self.sequence_str_cmp = ""
        self.prefix = prefix_str
        self.offset = 0

    def feed(self, token: int):
        piece = self._piece(token)
        self.sequence_str += piece
        if self.case_insensitive:
            split = max(len(self.prefix) - self.offset, 0)
            self.sequence_str_cmp += piece[:split] + piece[split:].lower()
        else:
            self.sequence_str_cmp += piece
        self.offset += len(piece)

    def next(self):
        index = _index(self.tokenizer, self.case_insensitive)
        pieces = _pieces(self.tokenizer)
        # characters of the remaining text that still belong to the prefix must match its case exactly
        cased = max(len(self.prefix) - self.offset, 0) if self.case_insensitive else 0
        pass_tokens: set[int] = set()
        end_tokens: set[int] = set()
        for option in self.options:
            full = self.prefix + option
            if full[:self.offset] != self.sequence_str_cmp:
                continue
            rest = full[self.offset:]
            key = rest.lower() if self.case_insensitive else rest
            passing = index.prefixing(key)
            ending = index.exactly(key)
            if cased:
                passing = {t for t in passing if pieces[t][:cased] == rest[:len(pieces[t][:cased])]}
                ending &= passing
            pass_tokens |= passing
            end_tokens |= ending
        return pass_tokens, end_tokens
