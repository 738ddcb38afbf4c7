"""ExLlamaV2DynamicJob: one generation request of the dynamic generator, its token sequence, its pages, and
the text it has released (stop strings and banned strings hold text back until they can be ruled out)."""

from __future__ import annotations

import random
import time

import torch

from .sampler import ExLlamaV2Sampler
from .dynamic_pages import page_hashes


class ExLlamaV2DynamicJob:
    def __init__(self, input_ids: torch.Tensor, max_new_tokens: int, min_new_tokens: int = 0, max_skips: int = 4,
                 gen_settings: ExLlamaV2Sampler.Settings | None = None, seed: int | None = None,
                 stop_conditions: list | tuple | set | None = None, decode_special_tokens: bool = False,
                 return_top_tokens: int = 0, return_logits: bool = False, return_probs: bool = False,
                 filters=None, filter_prefer_eos: bool = False, token_healing: bool = False, identifier=None,
                 banned_strings: list[str] | None = None, embeddings=None, return_logprobs: int | None = None,
                 interventions: list | None = None, interventions_file_root: str | None = None, **kwargs):
        if kwargs:
            raise TypeError(f"ExLlamaV2DynamicJob: unexpected arguments {sorted(kwargs)}")
        if isinstance(input_ids, list) and input_ids and isinstance(input_ids[0], torch.Tensor):
            raise NotImplementedError("ExLlamaV2DynamicJob: CFG (a list of input_ids) is not supported")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"ExLlamaV2DynamicJob: input_ids must be a (1, n) tensor, got {shape}")
        if input_ids.shape[1] < 1:
            raise ValueError("ExLlamaV2DynamicJob: input_ids is empty")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"ExLlamaV2DynamicJob: max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if min_new_tokens < 0 or min_new_tokens > max_new_tokens:
            raise ValueError(f"ExLlamaV2DynamicJob: min_new_tokens={min_new_tokens} must lie in [0, max_new_tokens]")
        if token_healing or embeddings:
            raise NotImplementedError("ExLlamaV2DynamicJob: token_healing and embeddings are not supported")
        if return_top_tokens < 0:
            raise ValueError("ExLlamaV2DynamicJob: return_top_tokens must be >= 0")

        if input_ids.dtype in (torch.bool,) or input_ids.is_floating_point() or input_ids.is_complex():
            raise ValueError(f"ExLlamaV2DynamicJob: input_ids must hold integer token ids, got {input_ids.dtype}")
        if gen_settings is not None and not isinstance(gen_settings, ExLlamaV2Sampler.Settings):
            raise TypeError(f"ExLlamaV2DynamicJob: gen_settings must be ExLlamaV2Sampler.Settings, got "
                            f"{type(gen_settings).__name__}")
        if gen_settings is not None:
            gen_settings.validate(name="gen_settings")
        if stop_conditions is not None and not isinstance(stop_conditions, (list, tuple, set)):
            raise TypeError(f"ExLlamaV2DynamicJob: stop_conditions must be a list of token ids and strings, got "
                            f"{type(stop_conditions).__name__} {stop_conditions!r}")
        if banned_strings is not None and (not isinstance(banned_strings, (list, tuple, set))
                                           or not all(isinstance(b, str) for b in banned_strings)):
            raise TypeError(f"ExLlamaV2DynamicJob: banned_strings must be a list of strings, got {banned_strings!r}")

        self.prompt_ids: list[int] = input_ids[0].tolist()
        self.max_new_tokens = max_new_tokens
        self.min_new_tokens = min_new_tokens
        self.max_skips = max_skips
        self.skips = 0
        self.gen_settings = (gen_settings or ExLlamaV2Sampler.Settings()).clone()
        self.seed = seed
        self.rng = random.Random(seed)
        self.stop_tokens: set[int] = set()
        self.stop_strings: list[str] = []
        for c in stop_conditions or []:
            if isinstance(c, bool) or not isinstance(c, (int, str)):
                raise ValueError(f"ExLlamaV2DynamicJob: stop condition {c!r} must be a token id (int) or a str")
            if isinstance(c, int):
                self.stop_tokens.add(c)
            elif c:
                self.stop_strings.append(c)
        # matched case-insensitively, as the original and the streaming generator do: lowered here, against the
        # lowered held text
        self.banned_strings = [s.lower() for s in (banned_strings or []) if s]
        self.decode_special_tokens = decode_special_tokens
        self.return_top_tokens = return_top_tokens
        self.return_logits = return_logits
        self.return_probs = return_probs
        self.return_logprobs = return_logprobs
        self.filters = list(filters or [])
        self.filter_prefer_eos = filter_prefer_eos
        self.identifier = identifier
        if interventions is not None and not isinstance(interventions, (list, tuple)):
            raise ValueError(f"ExLlamaV2DynamicJob: interventions must be a list of InterventionSpec or dicts, got "
                             f"{type(interventions).__name__}")
        # per-job edits (exllamav2.interventions): validated against the model by the generator, installed while
        # the job is active and bound to the job's tokens of the packed forward
        self.interventions = list(interventions or [])
        self.interventions_file_root = interventions_file_root
        self.intervention_edits: list | None = None  # (point, edit, target), built by the generator
        self.intervention_group = None

        # set by the generator
        self.serial: int | None = None
        self.generator = None
        self.sequence: list[int] = list(self.prompt_ids)
        self.kv_len = 0  # tokens whose K/V are in the cache
        self.draft_kv_len = 0  # tokens whose K/V are in the draft model's cache (speculative decoding)
        self.ngram = None  # the job's n-gram drafter (speculative decoding), made at its first draft
        self.accepted_draft_tokens = 0
        self.rejected_draft_tokens = 0
        self.pages: list[int] = []
        self.cached_tokens = 0
        self.prompt_page_hashes: list[bytes] = []
        self.hash_salt = b""
        self.registered_pages = 0
        self.new_token_ids: list[int] = []
        self.full_completion = ""
        self.stream = None
        self.held_text = ""
        self.held_tokens: list[int] = []
        self.held_extras: list[dict] = []
        # banned strings: new tokens before the token whose text began the pending (partial) match, or all of
        # them when none is pending; a rewind goes back there. ban_held: (held_text, len(held_tokens)) just before
        # that token, restored by the rewind (text held then for a stop string stays held)
        self.checkpoint = 0
        self.ban_held: tuple[str, int] | None = None
        self.blocked_at: dict[int, set[int]] = {}
        self.started = False
        self.finished = False
        self.preemptions = 0  # times the generator took the job's pages back (it resumes where it was)
        self.protect_until = 0  # sequence length below which a just-resumed job is not preempted again
        self.time_enqueue = time.time()
        self.time_start: float | None = None
        self.time_first_token: float | None = None
        self.time_last_token: float | None = None

    # ------------------------------------------------------------------ bookkeeping used by the generator

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    def total_pages(self, page_size: int) -> int:
        """Pages the job holds at its longest (prompt plus every new token)."""
        return -(-(self.prompt_len + self.max_new_tokens) // page_size)

    def pages_needed(self, tokens: int, page_size: int) -> int:
        """More pages the job must hold before the cache can take `tokens` of its sequence."""
        return max(0, -(-tokens // page_size) - len(self.pages))

    def prepare(self, generator) -> None:
        self.generator = generator
        tok = generator.tokenizer
        self.stream = tok.stream(self.decode_special_tokens)
        ps = generator.page_size
        key = getattr(getattr(generator, "model", None), "rope_length_key", lambda n: ())(self.prompt_len)
        # a length-dependent RoPE rotates a prompt's K by its length: prefixes match only at the same frequencies
        self.hash_salt = repr(key).encode() if any(key) else b""
        self.prompt_page_hashes = page_hashes(self.prompt_ids, ps, self.hash_salt)

    def reusable_hashes(self) -> list[bytes]:
        """Prefix pages the job may skip: at least the last prompt token must still run through the model. A job
        whose interventions edit prompt tokens computes its own prompt K/V."""
        ps = self.generator.page_size
        if self.edits_prompt():
            return []
        if self.intervention_edits:  # edited generated K/V is never published, so only the prompt can match
            return self.prompt_page_hashes[:(self.prompt_len - 1) // ps]
        # a job resuming after preemption may also find the pages of its generated tokens (published when it
        # was preempted), up to where a banned string could still rewind it (it must never write a shared page)
        floor = self.checkpoint if self.ban_held is not None else len(self.new_token_ids)
        n = (min(len(self.sequence), self.prompt_len + floor) - 1) // ps
        if n <= len(self.prompt_page_hashes):
            return self.prompt_page_hashes[:n]
        return page_hashes(self.sequence[:n * ps], ps, self.hash_salt)

    def publish_pages(self, page_table) -> None:
        """On preemption: name every full page of written K/V by its prefix hash, so the job (or another with the
        same prefix) finds it again while it is not recycled."""
        if self.intervention_edits:
            return
        ps = page_table.page_size
        full = min(self.kv_len, len(self.sequence)) // ps
        for i, h in enumerate(page_hashes(self.sequence[:full * ps], ps, self.hash_salt)):
            page_table.register(self.pages[i], h)

    def edits_prompt(self) -> bool:
        """Whether any of the job's interventions can touch a prompt token (position < prompt_len - 1)."""
        for _, _, target in self.intervention_edits or ():
            kind = target.positions
            if target.steps is not None or kind == "generated":  # decode steps only
                continue
            if isinstance(kind, str) or min(kind, default=self.prompt_len) < self.prompt_len - 1:
                return True
        return False

    def start_interventions(self, model) -> None:
        """Register the job's edits on the model, bound to this job's tokens (called when the job starts)."""
        from ..interventions import InterventionGroup, add_edit

        if not self.intervention_edits or self.intervention_group is not None:
            return
        group = InterventionGroup()
        try:
            for point, edit, target in self.intervention_edits:
                group.add(add_edit(model, point, edit, target)).stream = self
        except BaseException:
            group.remove()
            raise
        self.intervention_group = group

    def stop_interventions(self) -> None:
        if self.intervention_group is not None:
            self.intervention_group.remove()
            self.intervention_group = None

    def remaining_input(self) -> int:
        return len(self.sequence) - self.kv_len

    def is_prefilling(self) -> bool:
        return self.kv_len < self.prompt_len - 1

    def register_full_pages(self, page_table) -> None:
        if self.intervention_edits:  # edited K/V must not be found by other jobs' prefix lookups
            return
        ps = page_table.page_size
        full = min(self.kv_len, self.prompt_len) // ps
        while self.registered_pages < full:
            i = self.registered_pages
            page_table.register(self.pages[i], self.prompt_page_hashes[i])
            self.registered_pages += 1

    # ------------------------------------------------------------------ sampling and text

    def blocked_tokens(self) -> list[int]:
        blocked = set(self.blocked_at.get(len(self.new_token_ids), ()))
        if len(self.new_token_ids) < self.min_new_tokens:
            blocked |= self.stop_tokens
        return sorted(blocked)

    def needs_history(self) -> bool:
        s = self.gen_settings
        return (s.token_repetition_penalty != 1.0 or s.token_frequency_penalty != 0.0
                or s.token_presence_penalty != 0.0 or s.dry_multiplier > 0.0)

    def _hold_limit(self) -> int:
        """Characters that must stay held: the longest suffix of held_text that starts a stop or banned string."""
        keep = 0
        lowered = self.held_text.lower() if self.banned_strings else ""
        for s, text in [(s, self.held_text) for s in self.stop_strings] + [(b, lowered) for b in self.banned_strings]:
            for n in range(min(len(s) - 1, len(text)), keep, -1):
                if text.endswith(s[:n]):
                    keep = n
                    break
        return keep

    def accept_token(self, token: int, extras: dict) -> dict:
        """Append a sampled token; returns the result fields for this step (text, token ids, eos...)."""
        self.sequence.append(token)
        self.new_token_ids.append(token)
        self.held_tokens.append(token)
        self.held_extras.append(extras)
        now = time.time()
        if self.time_first_token is None:
            self.time_first_token = now
        self.time_last_token = now

        if token in self.stop_tokens:
            self.held_text += self.stream.finish()
            return self._release(len(self.held_text), eos_reason="stop_token", trigger={"eos_triggering_token": token})
        before = self.held_text
        self.held_text += self.stream.feed(token)

        if self.banned_strings:
            lowered = self.held_text.lower()
            found = any(b in lowered for b in self.banned_strings)
            if found or self._ban_pending(lowered):
                if self.ban_held is None:  # the match begins in this token's text (or in text held before it)
                    self.checkpoint = len(self.new_token_ids) - 1
                    self.ban_held = (before, len(self.held_tokens) - 1)
                if found:
                    self._rewind()
                    return self._release(0)
            else:
                self.checkpoint, self.ban_held = len(self.new_token_ids), None
        for s in self.stop_strings:
            pos = self.held_text.find(s)
            if pos >= 0:
                return self._release(pos, eos_reason="stop_string", trigger={"eos_triggering_string": s})
        if len(self.new_token_ids) >= self.max_new_tokens:
            self.held_text += self.stream.finish()
            return self._release(len(self.held_text), eos_reason="max_new_tokens")
        # while a banned string may still complete, hold the text from where it began: a rewind drops those tokens
        keep = max(self._hold_limit(), len(self.held_text) - len(self.ban_held[0]) if self.ban_held else 0)
        return self._release(len(self.held_text) - keep)

    def _ban_pending(self, lowered: str) -> bool:
        """Whether the held text (lowered) ends with a proper start of a banned string."""
        return any(lowered.endswith(b[:n]) for b in self.banned_strings for n in range(1, len(b)))

    def finish_with(self, eos_reason: str, trigger: dict | None = None) -> dict:
        self.held_text += self.stream.finish()
        return self._release(len(self.held_text), eos_reason=eos_reason, trigger=trigger)

    def _rewind(self) -> None:
        """A banned string appeared: drop the tokens since the checkpoint (the token whose text began the match)
        and block that token there; the text and tokens held before it stay held."""
        c = self.checkpoint
        offending = self.new_token_ids[c]
        self.blocked_at.setdefault(c, set()).add(offending)
        drop = len(self.new_token_ids) - c
        del self.new_token_ids[c:]
        del self.sequence[len(self.sequence) - drop:]
        self.kv_len = min(self.kv_len, len(self.sequence) - 1)
        self.draft_kv_len = min(self.draft_kv_len, self.kv_len)
        self.ngram = None  # its index holds n-grams of the dropped tokens
        self.held_text, n_held = self.ban_held
        self.ban_held = None
        del self.held_tokens[n_held:], self.held_extras[n_held:]
        self.stream = self.generator.tokenizer.stream(self.decode_special_tokens)
        self.stream.feed(self.new_token_ids)

    def _release(self, n_chars: int, eos_reason: str | None = None, trigger: dict | None = None) -> dict:
        text = self.held_text[:n_chars]
        eos = eos_reason is not None
        release_tokens = eos or n_chars == len(self.held_text)
        self.held_text = self.held_text[n_chars:]
        if self.ban_held is not None:  # text before the pending match may go (it is never past where it began)
            self.ban_held = (self.ban_held[0][n_chars:], self.ban_held[1])
        self.full_completion += text
        out = {"text": text, "eos": eos}
        if release_tokens:
            out["token_ids"] = self.held_tokens
            out["extras"] = self.held_extras
            self.held_tokens, self.held_extras = [], []
        else:
            out["token_ids"], out["extras"] = [], []
        if eos:
            self.finished = True
            out["eos_reason"] = eos_reason
            out.update(trigger or {})
        return out

    def progress(self) -> tuple[int, int]:
        return min(self.kv_len, self.prompt_len), self.prompt_len

    def timings(self) -> dict:
        start = self.time_start or self.time_enqueue
        first = self.time_first_token or start
        last = self.time_last_token or first
        return {"time_enqueued": start - self.time_enqueue, "time_prefill": first - start,
                "time_generate": last - first}

    def __repr__(self) -> str:
        return (f"ExLlamaV2DynamicJob(serial={self.serial}, identifier={self.identifier!r}, "
                f"prompt_tokens={self.prompt_len}, new_tokens={len(self.new_token_ids)})")
