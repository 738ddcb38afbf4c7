"""ExLlamaV2BaseGenerator: blocking generation of a fixed number of tokens, for one prompt or a left-padded batch."""

from __future__ import annotations

import random
import threading

import torch

from ..runtime.stack_chunk import fresh_stack_chunk

from exllamav2.generator.sampler import ExLlamaV2Sampler


def stop_ids(tokenizer, stop_token: int | None) -> set[int]:
    """The original's convention: -1 means the tokenizer's EOS ids, None means never stop early."""
    if stop_token is None:
        return set()
    if stop_token == -1:
        return set(tokenizer.eos_token_ids or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []))
    return {int(stop_token)}


def left_pad_mask(offsets: torch.Tensor, total_len: int) -> torch.Tensor:
    """Bool keep-mask (batch, total_len): False on each row's left padding (offsets are minus the pad counts)."""
    positions = torch.arange(total_len).unsqueeze(0)
    return positions >= (-offsets).view(-1, 1)


def begin_filters(filters: list | None, prefix: str = "") -> None:
    for f in filters or []:
        f.begin(prefix)


def feed_filters(filters: list | None, token: int) -> None:
    for f in filters or []:
        f.feed(token)


class ExLlamaV2BaseGenerator:

    def __init__(self, model, cache, tokenizer):
        self.model = model
        self.cache = cache
        self.tokenizer = tokenizer
        self.sequence_ids: torch.Tensor | None = None
        self.abort_event: threading.Event | None = None

    def warmup(self) -> None:
        """Run one short forward pass so the first real call does not pay for lazy set-up."""
        ids = torch.zeros((1, 2), dtype=torch.long)
        self.cache.current_seq_len = 0
        self.model.forward(ids, self.cache, preprocess_only=True)
        self.cache.current_seq_len = 0
        self.sequence_ids = None

    def full(self) -> bool:
        return self.sequence_ids is not None and self.sequence_ids.shape[-1] >= self.cache.max_seq_len

    @fresh_stack_chunk
    @torch.inference_mode()
    def generate_simple(
        self,
        prompt: str | list[str],
        gen_settings: ExLlamaV2Sampler.Settings,
        num_tokens: int,
        seed: int | None = None,
        token_healing: bool = False,
        encode_special_tokens: bool = False,
        decode_special_tokens: bool = False,
        loras=None,
        stop_token: int | None = -1,
        add_bos: bool = False,
        abort_event: threading.Event | None = None,
        input_embeddings: torch.Tensor | None = None,
        completion_only: bool = False,
        filters: list | None = None,
        filter_prefer_eos: bool = False,
        **kwargs,
    ) -> str | list[str]:
        """Generate up to `num_tokens` tokens per prompt. A list of prompts is one left-padded batch (the cache
        needs that batch size); each row stops at its first stop token. Returns the prompt plus completion (or the
        completion alone with `completion_only`), a str for a str prompt and a list for a list."""
        if input_embeddings is not None:
            raise NotImplementedError("generate_simple: input_embeddings are not supported by this engine")
        if num_tokens < 0:
            raise ValueError(f"generate_simple: num_tokens must be >= 0, got {num_tokens}")
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        batch = len(prompts)
        if batch == 0:
            raise ValueError("generate_simple: empty prompt list")
        if batch > self.cache.batch_size:
            raise ValueError(f"generate_simple: {batch} prompts need a cache with batch_size >= {batch}, "
                             f"this one has {self.cache.batch_size}")
        if filters and batch > 1:
            raise ValueError("generate_simple: filters need a single prompt")
        if loras is not None and not isinstance(loras, (list, tuple)):
            loras = [loras]
        rng = random.Random(seed)
        self.abort_event = abort_event

        ids, offsets = self.tokenizer.encode(prompts, add_bos=add_bos, encode_special_tokens=encode_special_tokens,
                                             return_offsets=True)
        if ids.shape[-1] == 0:
            raise ValueError("generate_simple: the prompt encodes to no tokens (use add_bos=True for an empty prompt)")
        prefix_token = None
        if token_healing and ids.shape[-1] >= 2:
            prefix_token = ids[:, -1:]
            ids = ids[:, :-1]
        prompt_len = ids.shape[-1]
        total = prompt_len + num_tokens
        self.cache.check_room(total, past_len=0)

        padded = bool((offsets != 0).any())
        input_mask = left_pad_mask(offsets, total) if padded else None
        position_offsets = offsets if padded else None

        stops = stop_ids(self.tokenizer, stop_token)
        stop_tensor = torch.tensor(sorted(stops), dtype=torch.long)
        finished = torch.zeros(batch, dtype=torch.bool)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

        begin_filters(filters)
        self.cache.current_seq_len = 0
        self.sequence_ids = ids
        fwd = dict(input_mask=input_mask, position_offsets=position_offsets, loras=loras, abort_event=abort_event)
        if prompt_len > 1:
            self.model.forward(ids[:, :-1], self.cache, preprocess_only=True, **fwd)
        for _ in range(num_tokens):
            if abort_event is not None and abort_event.is_set():
                break
            logits = self.model.forward(self.sequence_ids[:, -1:], self.cache, **fwd)
            if logits is None:
                break
            token, _, _, _, end_filter = ExLlamaV2Sampler.sample(
                logits, gen_settings, self.sequence_ids, rng.random(), self.tokenizer,
                prefix_token=prefix_token, filters=filters, filter_prefer_eos=filter_prefer_eos)
            prefix_token = None
            token = token.cpu().view(batch, 1)
            feed_filters(filters, int(token[0, 0]))
            # rows that already stopped keep emitting padding, never text
            token = torch.where(finished.view(-1, 1), torch.full_like(token, pad_id), token)
            self.sequence_ids = torch.cat([self.sequence_ids, token], dim=-1)
            if stops:
                finished |= torch.isin(token.view(-1), stop_tensor)
            if end_filter or bool(finished.all()):
                break

        texts = self._decode_rows(offsets, prompt_len, stops, decode_special_tokens, completion_only)
        return texts[0] if single else texts

    def _decode_rows(self, offsets, prompt_len, stops, decode_special_tokens, completion_only) -> list[str]:
        texts = []
        for row in range(self.sequence_ids.shape[0]):
            seq = self.sequence_ids[row].tolist()
            new = seq[prompt_len:]
            cut = next((i for i, t in enumerate(new) if t in stops), len(new))
            if completion_only:
                kept = new[:cut]
            else:
                kept = seq[-int(offsets[row, 0]):prompt_len] if offsets[row, 0] else seq[:prompt_len]
                kept = kept + new[:cut]
            texts.append(self.tokenizer.decode_list(kept, decode_special_tokens))
        return texts
