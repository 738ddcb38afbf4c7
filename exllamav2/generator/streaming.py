"""ExLlamaV2StreamingGenerator: one token per call, text released only once no stop or banned string can
still match it."""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field

import torch

from exllamav2.generator.base import ExLlamaV2BaseGenerator, begin_filters, feed_filters
from exllamav2.generator.sampler import ExLlamaV2Sampler
from exllamav2.generator.sampler_hooks import ExLlamaV2PostSamplingResult, run_post_sampling_hooks
from exllamav2.runtime.stack_chunk import fresh_stack_chunk


def overlaps_start(text: str, target: str) -> bool:
    """True if some suffix of `text` is a proper start of `target` (the match may complete later)."""
    for j in range(min(len(text), len(target) - 1), 0, -1):
        if text.endswith(target[:j]):
            return True
    return False


@dataclass
class _Held:
    """Output produced but not yet released: text plus the tokens (and extras) it came from."""
    text: str = ""
    tokens: list = field(default_factory=list)
    probs: list = field(default_factory=list)
    top_tokens: list = field(default_factory=list)
    top_probs: list = field(default_factory=list)
    logits: list = field(default_factory=list)

    def add(self, text, token, prob, top_tokens, top_probs, logits):
        self.text += text
        self.tokens.append(token)
        for name, value in (("probs", prob), ("top_tokens", top_tokens), ("top_probs", top_probs), ("logits", logits)):
            if value is not None:
                getattr(self, name).append(value)

    def copy(self) -> "_Held":
        return _Held(self.text, list(self.tokens), list(self.probs), list(self.top_tokens), list(self.top_probs),
                     list(self.logits))


@dataclass
class _BanCheckpoint:
    seq_len: int  # length of sequence_ids before the offending token
    held: _Held
    stream_state: tuple  # the text stream's (ids, prefix_offset, read_offset) before the offending token
    offending_token: int
    skip_chars: int


class ExLlamaV2StreamingGenerator(ExLlamaV2BaseGenerator):

    tail_decode_tokens: int = 2

    def __init__(self, model, cache, tokenizer, draft_model=None, draft_cache=None, num_speculative_tokens: int = 5):
        super().__init__(model, cache, tokenizer)
        self.stop_strings: set[str] = set()
        self.stop_tokens: set[int] = set(tokenizer.eos_token_ids or [tokenizer.eos_token_id])
        self.max_new_tokens: int | None = None
        self.draft_model = draft_model
        self.num_speculative_tokens = num_speculative_tokens
        if draft_model is not None and draft_cache is None:
            from exllamav2.cache import ExLlamaV2Cache
            draft_cache = ExLlamaV2Cache(draft_model, batch_size=cache.batch_size, max_seq_len=cache.max_seq_len)
        self.draft_cache = draft_cache
        self.speculative_prob_threshold = 0.25
        self.total_tokens = 0
        self.total_draft_tokens = 0
        self.accepted_draft_tokens = 0
        self.future_tokens: list[int] | None = None  # draft tokens the main model has already scored
        self.future_logits: torch.Tensor | None = None  # (batch, n, vocab) main-model logits, one per position
        self.draft_ids: list[int] = []  # the tokens the draft cache holds, position by position
        self.settings = None
        self.input_mask = None
        self.position_offsets = None
        self.active_loras = None
        self.return_probabilities = False
        self.return_top_tokens = 0
        self.return_logits = False
        self.decode_special_tokens = False
        self.banned_strings: list[str] = []
        self.filters: list = []
        self.filter_prefer_eos = False
        self.rng = random.Random()
        self.new_tokens = 0

    # ------------------------------------------------------------------ set-up

    def set_stop_conditions(self, stop_conditions) -> None:
        """Token ids and/or strings that end the stream; strings may span several tokens."""
        self.stop_strings, self.stop_tokens = set(), set()
        for s in stop_conditions:
            if isinstance(s, bool) or not isinstance(s, (int, str)):
                raise ValueError(f"set_stop_conditions: expected token ids (int) or strings, got {s!r}")
            (self.stop_tokens if isinstance(s, int) else self.stop_strings).add(s)
        self.stop_strings.discard("")

    def begin_stream(self, input_ids, gen_settings, token_healing=False, loras=None, input_mask=None,
                     position_offsets=None, abort_event=None, **kwargs) -> None:
        """Legacy form of begin_stream_ex."""
        self.begin_stream_ex(input_ids, gen_settings, token_healing, loras, input_mask, position_offsets,
                             abort_event=abort_event, **kwargs)

    @torch.inference_mode()
    def begin_stream_ex(
        self,
        input_ids: torch.Tensor,
        gen_settings: ExLlamaV2Sampler.Settings,
        token_healing: bool = False,
        loras=None,
        input_mask: torch.Tensor | None = None,
        position_offsets: torch.Tensor | None = None,
        return_probabilities: bool = False,
        return_top_tokens: int = 0,
        return_logits: bool = False,
        abort_event: threading.Event | None = None,
        input_embeddings: torch.Tensor | None = None,
        decode_special_tokens: bool = False,
        banned_strings: list[str] | None = None,
        filters: list | None = None,
        filter_prefer_eos: bool = False,
        max_new_tokens: int | None = None,
        seed: int | None = None,
        **kwargs,
    ) -> None:
        """Start a completion of `input_ids` (1, n), or (2, n) for CFG. The cache is reused for the prefix shared
        with the previous sequence. `max_new_tokens` (or the attribute of that name) caps the completion."""
        if input_embeddings is not None:
            raise NotImplementedError("begin_stream_ex: input_embeddings are not supported by this engine")
        if self.draft_model is not None and (input_ids.shape[0] != 1 or input_mask is not None):
            raise ValueError("begin_stream_ex: speculative decoding takes batch 1 without an input mask")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[-1] == 0:
            raise ValueError("begin_stream_ex: input_ids must be a non-empty (batch, n) tensor of token ids")
        if input_ids.shape[0] > 2 or (input_ids.shape[0] == 2 and gen_settings.cfg_scale is None):
            raise ValueError(f"begin_stream_ex: batch {input_ids.shape[0]}: the streaming generator takes batch 1, "
                             f"or batch 2 with gen_settings.cfg_scale set (CFG)")
        if input_ids.shape[0] > self.cache.batch_size:
            raise ValueError(f"begin_stream_ex: batch {input_ids.shape[0]} needs a cache with that batch_size, "
                             f"this one has {self.cache.batch_size}")
        self.settings = gen_settings
        self.active_loras = [loras] if loras is not None and not isinstance(loras, (list, tuple)) else loras
        self.input_mask = input_mask
        self.position_offsets = position_offsets
        self.abort_event = abort_event
        self.return_probabilities = return_probabilities
        self.return_top_tokens = return_top_tokens
        self.return_logits = return_logits
        self.decode_special_tokens = decode_special_tokens
        self.banned_strings = [s.lower() for s in (banned_strings or []) if s]
        self.filters = list(filters or [])
        self.filter_prefer_eos = filter_prefer_eos
        if max_new_tokens is not None:
            self.max_new_tokens = max_new_tokens
        if seed is not None:
            self.rng = random.Random(seed)

        self.held = _Held()
        self.ban_checkpoint: _BanCheckpoint | None = None
        self.blocked_tokens: list[int] = []
        self.blocked_position = -1
        self.new_tokens = 0
        self.skip_chars = 0
        self.first_token = True

        input_ids = input_ids.cpu()
        self.future_tokens = self.future_logits = None
        self._prefill_reusing_cache(input_ids)
        self.heal_next_token = token_healing and self.sequence_ids.shape[-1] >= 2
        # the healed token replaces the prompt's last one and counts as new
        self.prompt_len = self.sequence_ids.shape[-1] - (1 if self.heal_next_token else 0)
        self.text_stream = self.tokenizer.stream(decode_special_tokens)
        context = self.sequence_ids[0, :-1] if self.heal_next_token else self.sequence_ids[0]
        self.text_stream.start_after(context[-self.tail_decode_tokens:])

    def _prefill_reusing_cache(self, input_ids: torch.Tensor) -> None:
        reuse = 0
        prev = self.sequence_ids
        if (prev is not None and self.input_mask is None and prev.shape[0] == input_ids.shape[0]
                and self.cache.current_seq_len > 0):
            prev = prev[:, :self.cache.current_seq_len + 1]
            n = min(prev.shape[-1], input_ids.shape[-1])
            differs = (prev[:, :n] != input_ids[:, :n]).any(dim=0).nonzero()
            reuse = int(differs[0]) if differs.numel() else n
        if reuse < 2:
            self.cache.current_seq_len = 0
            self.sequence_ids = input_ids[:, :1]
            self._feed(input_ids[:, 1:])
        else:
            self.cache.current_seq_len = reuse - 1
            self.sequence_ids = input_ids[:, :reuse]
            self._feed(input_ids[:, reuse:])

    def _feed(self, tokens: torch.Tensor) -> None:
        """Append `tokens` and run everything but the new last token through the model."""
        start = self.cache.current_seq_len
        self.sequence_ids = torch.cat([self.sequence_ids, tokens], dim=-1)
        if self.sequence_ids.shape[-1] - 1 > start:
            self.model.forward(self.sequence_ids[:, start:-1], self.cache, preprocess_only=True,
                               loras=self.active_loras, input_mask=self.input_mask,
                               position_offsets=self.position_offsets, abort_event=self.abort_event)
        # an aborted prefill leaves a shorter cache; never claim more than it holds
        self.sequence_ids = self.sequence_ids[:, :self.cache.current_seq_len + 1]

    # ------------------------------------------------------------------ streaming

    def stream(self, **kwargs) -> tuple:
        """Legacy form of stream_ex: (chunk, eos, chunk_token_ids[, probs][, logits])."""
        if self.return_top_tokens:
            raise ValueError("stream(): use stream_ex() to get top tokens")
        r = self.stream_ex(**kwargs)
        out = [r["chunk"], r["eos"], r["chunk_token_ids"]]
        if self.return_probabilities:
            out.append(r["probs"])
        if self.return_logits:
            out.append(r["logits"])
        return tuple(out)

    @fresh_stack_chunk
    @torch.inference_mode()
    def stream_ex(self, ban_tokens: list[int] | None = None, **kwargs) -> dict:
        """One step. Returns a dict with `chunk` (text, may be empty while text is held), `eos`,
        `chunk_token_ids` (1, n), `eos_reason` when eos (stop_token, stop_string, max_new_tokens, end_filter,
        max_seq_len, aborted), and `probs`/`top_tokens`/`top_probs`/`logits` when requested. A step that
        rewinds for a banned string returns the suppressed text under `suppressed`."""
        if self.settings is None:
            raise RuntimeError("stream_ex: call begin_stream_ex first")
        if self.abort_event is not None and self.abort_event.is_set():
            return self._release(eos_reason="aborted")
        if self.max_new_tokens is not None and self.new_tokens >= self.max_new_tokens:
            return self._release(eos_reason="max_new_tokens")
        if self.cache.current_seq_len + 1 > self.cache.max_seq_len:
            return self._release(eos_reason="max_seq_len")

        blocked = list(ban_tokens or [])
        if self.cache.current_seq_len == self.blocked_position:
            blocked += self.blocked_tokens

        prefix_token = None
        if self.heal_next_token:
            prefix_token = self.sequence_ids[:, -1:]
            self.skip_chars = len(self._piece_text(int(prefix_token[0, 0])))
            self.sequence_ids = self.sequence_ids[:, :-1]
            self.cache.current_seq_len -= 1
            self.heal_next_token = False
        if self.first_token:
            begin_filters(self.filters)
            self.first_token = False

        token, prob, top_tokens, top_probs, logits, end_filter = self._next_token(prefix_token, blocked)
        if token is None:
            return self._release(eos_reason="aborted")
        self.new_tokens += 1
        if token in self.stop_tokens:
            return self._release(eos_reason="stop_token")

        ts = self.text_stream
        self._stream_before = (len(ts.ids), ts.prefix_offset, ts.read_offset)  # for a banned-string checkpoint
        text = ts.feed(token)
        if self.skip_chars:
            cut = min(self.skip_chars, len(text))
            text, self.skip_chars = text[cut:], self.skip_chars - cut
        self.held.add(text, token, prob, top_tokens, top_probs, logits)
        if end_filter:
            return self._release(eos_reason="end_filter")

        for ss in self.stop_strings:
            pos = self.held.text.find(ss)
            if pos != -1:
                self.held.text = self.held.text[:pos]
                return self._release(eos_reason="stop_string")
        if any(overlaps_start(self.held.text, ss) for ss in self.stop_strings):
            return self._nothing()

        held_lower = self.held.text.lower()
        if self.banned_strings:
            if any(ban in held_lower for ban in self.banned_strings):
                if self.ban_checkpoint is None:
                    self._set_checkpoint(text, token)
                return self._rewind()
            if any(overlaps_start(held_lower, ban) for ban in self.banned_strings):
                if self.ban_checkpoint is None:
                    self._set_checkpoint(text, token)
                return self._nothing()
        self.ban_checkpoint = None
        self.blocked_tokens = []
        self.blocked_position = -1
        if self.max_new_tokens is not None and self.new_tokens >= self.max_new_tokens:
            return self._release(eos_reason="max_new_tokens")
        return self._release()

    def _piece_text(self, token: int) -> str:
        """Text that `token` adds after the current sequence (used to hide a healed prompt token's text)."""
        tail = self.sequence_ids[0, -self.tail_decode_tokens - 1:-1].tolist()
        before = self.tokenizer.decode_list(tail, self.decode_special_tokens)
        return self.tokenizer.decode_list(tail + [token], self.decode_special_tokens)[len(before):]

    def _next_token(self, prefix_token, blocked):
        """Forward the last token, sample, append. Returns (token, prob, top_tokens, top_probs, logits, end)."""
        if self.draft_model is not None and prefix_token is None:
            logits = self._speculative_logits()
        else:
            self.future_tokens = self.future_logits = None
            logits = self.model.forward(self.sequence_ids[:, -1:], self.cache, loras=self.active_loras,
                                        input_mask=self.input_mask, position_offsets=self.position_offsets,
                                        abort_event=self.abort_event)
        if logits is None:
            return None, None, None, None, None, False
        logits = logits.float().cpu()
        token, top_tokens, top_probs, prob, end_filter = ExLlamaV2Sampler.sample(
            logits, self.settings, self.sequence_ids[:1], self.rng.random(), self.tokenizer,
            prefix_token=prefix_token[:1] if prefix_token is not None else None,
            return_top_tokens=self.return_top_tokens, blocked_tokens=blocked or None,
            filters=self.filters, filter_prefer_eos=self.filter_prefer_eos)
        feed = True
        if self.settings.post_sampling_hooks:
            result = ExLlamaV2PostSamplingResult(
                sampled_token=token, sampled_prob=prob, logits=logits,
                candidate_tokens=None if top_tokens.is_meta else top_tokens,
                candidate_probs=None if top_probs.is_meta else top_probs)
            run_post_sampling_hooks(self.settings.post_sampling_hooks, result)
            token, feed = result.sampled_token, result.feed_filters
        token_id = int(token.view(-1)[0])
        if self.future_tokens:
            if self.future_tokens[0] == token_id:
                self.future_tokens = self.future_tokens[1:]
                self.accepted_draft_tokens += 1
            else:
                self.future_tokens = self.future_logits = None
        if feed:
            feed_filters(self.filters, token_id)
        rows = self.sequence_ids.shape[0]
        self.sequence_ids = torch.cat([self.sequence_ids, torch.full((rows, 1), token_id, dtype=torch.long)], dim=-1)
        return (token_id,
                prob.view(1, 1).float().cpu() if self.return_probabilities else None,
                top_tokens.view(1, 1, -1) if self.return_top_tokens else None,
                top_probs.view(1, 1, -1) if self.return_top_tokens else None,
                logits[0, 0] if self.return_logits else None,
                bool(end_filter))

    # ------------------------------------------------------------------ speculative decoding

    def _speculative_logits(self) -> torch.Tensor | None:
        """Main-model logits (batch, 1, vocab) for the next position. When none are stored, the draft model
        proposes up to num_speculative_tokens tokens and the main model scores them all in one forward pass;
        the stored logits stay valid as long as the sampled tokens follow the draft."""
        if self.future_logits is None or self.future_logits.shape[1] == 0:
            draft = self._draft()
            inputs = torch.cat([self.sequence_ids[:, -1:], torch.tensor([draft], dtype=torch.long)], dim=-1)
            logits = self.model.forward(inputs, self.cache, loras=self.active_loras,
                                        position_offsets=self.position_offsets, abort_event=self.abort_event)
            if logits is None:
                return None
            self.cache.current_seq_len -= inputs.shape[-1]
            self.future_logits, self.future_tokens = logits.float().cpu(), draft
            self.total_draft_tokens += len(draft)
        logits = self.future_logits[:, :1]
        self.future_logits = self.future_logits[:, 1:]
        self.cache.current_seq_len += 1
        self.total_tokens += 1
        return logits

    def _draft(self) -> list[int]:
        """Greedy draft continuation of the current sequence, stopping early when the draft is unsure."""
        room = self.cache.max_seq_len - self.cache.current_seq_len - 1
        k = max(0, min(self.num_speculative_tokens, room, self.draft_cache.max_seq_len - self.sequence_ids.shape[-1]))
        if k == 0:
            return []
        # bring the draft cache up to the sequence, reusing what still matches
        context = self.sequence_ids[0, :-1].tolist()
        same = 0
        limit = min(len(self.draft_ids), len(context), self.draft_cache.current_seq_len)
        while same < limit and self.draft_ids[same] == context[same]:
            same += 1
        self.draft_cache.current_seq_len = same
        if same < len(context):
            self.draft_model.forward(torch.tensor([context[same:]]), self.draft_cache, preprocess_only=True)
        self.draft_ids = list(context)
        token = int(self.sequence_ids[0, -1])
        draft = []
        for i in range(k):
            logits = self.draft_model.forward(torch.tensor([[token]]), self.draft_cache)
            self.draft_ids.append(token)
            probs = torch.softmax(logits[0, -1].float(), dim=-1)
            p, token = probs.max(dim=-1)
            token = int(token)
            if float(p) < self.speculative_prob_threshold:
                break
            draft.append(token)
        return draft

    # ------------------------------------------------------------------ banned strings

    def _set_checkpoint(self, new_text: str, token: int) -> None:
        n_ids, prefix, read = self._stream_before
        held = self.held.copy()
        held.text = held.text[:len(held.text) - len(new_text)]
        for name in ("tokens", "probs", "top_tokens", "top_probs", "logits"):
            lst = getattr(held, name)
            if lst:
                lst.pop()
        self.ban_checkpoint = _BanCheckpoint(
            seq_len=self.sequence_ids.shape[-1] - 1, held=held,
            stream_state=(list(self.text_stream.ids[:n_ids]), prefix, read), offending_token=token,
            skip_chars=self.skip_chars)
        self.blocked_position = self.sequence_ids.shape[-1] - 2

    def _rewind(self) -> dict:
        cp = self.ban_checkpoint
        suppressed = self.held.text[len(cp.held.text):]
        self.sequence_ids = self.sequence_ids[:, :cp.seq_len]
        self.cache.current_seq_len = cp.seq_len - 1
        self.held = cp.held
        # the text stream as it was before the offending token: text it held back then (an incomplete character)
        # still comes out
        ids, self.text_stream.prefix_offset, self.text_stream.read_offset = cp.stream_state
        self.text_stream.ids = list(ids)
        self.skip_chars = cp.skip_chars
        self.blocked_tokens.append(cp.offending_token)
        self.future_tokens = self.future_logits = None
        self.ban_checkpoint = None
        self.new_tokens = cp.seq_len - self.prompt_len
        out = self._nothing()
        out["suppressed"] = suppressed
        return out

    # ------------------------------------------------------------------ results

    def _nothing(self) -> dict:
        return self._result("", False, [], _Held())

    def _release(self, eos_reason: str | None = None) -> dict:
        held = self.held
        self.held = _Held()
        text = held.text
        if eos_reason is not None and eos_reason != "stop_string":
            text += self.text_stream.finish()
        return self._result(text, eos_reason is not None, held.tokens, held, eos_reason)

    def _result(self, chunk: str, eos: bool, tokens: list[int], held: _Held, eos_reason: str | None = None) -> dict:
        r = {"chunk": chunk, "eos": eos, "chunk_token_ids": torch.tensor([tokens], dtype=torch.long).view(1, -1)}
        if eos:
            r["eos_reason"] = eos_reason
        if self.return_probabilities:
            r["probs"] = torch.cat(held.probs, 1) if held.probs else torch.empty((1, 0))
        if self.return_top_tokens:
            k = self.return_top_tokens
            r["top_tokens"] = torch.cat(held.top_tokens, 1) if held.top_tokens else torch.empty((1, 0, k), dtype=torch.long)
            r["top_probs"] = torch.cat(held.top_probs, 1) if held.top_probs else torch.empty((1, 0, k))
        if self.return_logits:
            r["logits"] = (torch.stack(held.logits, 0).unsqueeze(0) if held.logits
                           else torch.empty((1, 0, self.model.config.vocab_size)))
        return r

    # ------------------------------------------------------------------ speculative decoding stats

    def reset_sd_stats(self) -> None:
        self.total_tokens = self.total_draft_tokens = self.accepted_draft_tokens = 0

    def get_sd_stats(self) -> tuple:
        efficiency = self.accepted_draft_tokens / self.total_tokens if self.total_tokens else 0
        accuracy = self.accepted_draft_tokens / self.total_draft_tokens if self.total_draft_tokens else 0
        return efficiency, accuracy, self.total_tokens, self.total_draft_tokens, self.accepted_draft_tokens
