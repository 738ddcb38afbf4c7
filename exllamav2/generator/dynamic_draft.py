"""Where the dynamic generator's speculative tokens come from (verification is in dynamic.py).

- `NgramDraft`: prompt-lookup drafting from one job's own tokens (prompt and generated). The longest suffix of
  the sequence (up to `max_ngram` tokens, down to one) that occurred before proposes the tokens that followed
  its latest earlier occurrence; when those run into the end of the sequence the continuation repeats with the
  same period, which is what a repetitive text does.
- `DraftModel`: a smaller model over the same vocabulary, greedy, with its own paged cache laid out on the same
  pages as the main cache (a page index names the same positions in both), so prompt pages shared through the
  page table hold the draft's K/V too. The draft cache only ever affects how many drafts are accepted, never the
  output: every draft is checked by the main model.

`packed_forward` is the generator's packed, paged forward through any model (the main one or the draft).
"""

from __future__ import annotations

import torch

from ..attn_params import PagedParams


@torch.inference_mode()
def packed_forward(model, cache, ids: torch.Tensor, params: PagedParams, rows: torch.Tensor,
                   loras=None) -> torch.Tensor | None:
    """The packed forward; only `rows` of the packed tokens go through the head. Returns (len(rows), vocab) fp32,
    or None without rows (the forward then stops after the last layer that writes the cache). With a compiled or
    captured decode step (model.compile_decode), the one-token sequences run through it (runtime/paged_decode.py)."""
    runner = model.decode_runner
    if getattr(runner, "paged", None) is not None and runner.paged.usable(model, cache, loras):
        logits = runner.paged.forward(ids, cache, params, rows, lambda i, p, r: _eager(model, cache, i, p, r, loras))
        if logits is not None:
            return logits
    return _eager(model, cache, ids, params, rows, loras)


def _eager(model, cache, ids, params, rows, loras):
    x = ids
    # fewer rows than tokens (a prompt's chunk): from the last KV layer's attention on, only those rows
    prune = model.last_rows_layer() if 0 < len(rows) < ids.shape[1] else -1
    for idx, module in enumerate(model.modules):
        if not len(rows) and idx > model.last_kv_layer_idx:
            return None
        if idx == model.head_layer_idx and prune < 0:
            x = x[:, rows.to(x.device)]
        dev = module.device()
        if idx > 0 and (dev != "cpu" or x.device.type != "cpu") and x.device != torch.device(dev):
            x = x.to(dev)
        if idx == prune:
            x = module.forward(x, cache=cache, attn_params=params, past_len=0, loras=loras,
                               out_rows=rows.to(x.device))
        else:
            x = module.forward(x, cache=cache, attn_params=params, past_len=0, loras=loras)
    return model.final_logits(x[0])


class NgramDraft:
    """Prompt-lookup drafts for one job's token sequence, which only grows (a job cut back by a banned string
    starts a new NgramDraft). Keeps, per n-gram length, the position after each n-gram's latest occurrence."""

    def __init__(self, max_ngram: int, min_ngram: int = 2):
        if max_ngram < 1:
            raise ValueError(f"ExLlamaV2DynamicGenerator: max_ngram must be >= 1, got {max_ngram}")
        self.max_ngram = max_ngram
        # a lone matching token predicts poorly, and a rejected draft still costs its rows in the forward
        # (bench/bench_speculative.py): suffixes of at least two tokens, unless max_ngram is 1
        self.min_ngram = max(1, min(min_ngram, max_ngram))
        self.follows: list[dict[tuple, int]] = [{} for _ in range(max_ngram + 1)]
        self.indexed = 1  # n-grams ending before this position are in `follows`

    def _catch_up(self, seq: list[int]) -> None:
        """Index the n-grams ending at positions 1 .. len(seq) - 1 (each has a following token in `seq`)."""
        if len(seq) < self.indexed:
            self.follows = [{} for _ in range(self.max_ngram + 1)]
            self.indexed = 1
        for end in range(self.indexed, len(seq)):
            for n in range(1, min(self.max_ngram, end) + 1):
                self.follows[n][tuple(seq[end - n:end])] = end
        self.indexed = max(self.indexed, len(seq))

    def draft(self, seq: list[int], k: int) -> list[int]:
        """Up to `k` tokens predicted to follow `seq`; none if no suffix of it occurred earlier."""
        if k < 1 or len(seq) < 2:
            return []
        self._catch_up(seq)
        for n in range(min(self.max_ngram, len(seq) - 1), self.min_ngram - 1, -1):
            end = self.follows[n].get(tuple(seq[len(seq) - n:]))
            if end is not None:
                out: list[int] = []
                for j in range(end, end + k):
                    out.append(seq[j] if j < len(seq) else out[j - len(seq)])
                return out
        return []


class DraftModel:
    """A draft model and its paged cache. Each speculating job's `draft_kv_len` counts the positions whose draft
    K/V are in `cache` (the main cache's `kv_len` counterpart)."""

    def __init__(self, model, cache, main_model, main_cache):
        from ..cache import ExLlamaV2Cache

        if cache is None:
            cache = ExLlamaV2Cache(model, 1, main_cache.max_seq_len)
        if not getattr(cache, "supports_paged", True) or cache.batch_size != 1:
            raise ValueError(f"ExLlamaV2DynamicGenerator: draft_cache must be an ExLlamaV2Cache with batch_size=1, "
                             f"got {type(cache).__name__} with batch_size={cache.batch_size}")
        if cache.max_seq_len != main_cache.max_seq_len:
            raise ValueError(f"ExLlamaV2DynamicGenerator: draft_cache.max_seq_len={cache.max_seq_len} must equal the "
                             f"cache's max_seq_len={main_cache.max_seq_len} (both are paged the same way)")
        if cache.model is not model:
            raise ValueError("ExLlamaV2DynamicGenerator: draft_cache was made for another model than draft_model")
        self.model, self.cache = model, cache
        # a draft may have a padded vocabulary of another size; only ids the main model knows are proposed
        self.vocab = min(model.config.vocab_size, main_model.config.vocab_size)

    def forward(self, feeds: list[tuple], page_size: int, want_logits: bool) -> torch.Tensor | None:
        """One packed draft forward: feeds are (job, tokens) written from each job's draft_kv_len on. Returns
        the logits of each job's last token, or None when `want_logits` is false."""
        ids = torch.tensor([t for _, toks in feeds for t in toks], dtype=torch.long).unsqueeze(0)
        params = PagedParams([job.pages for job, _ in feeds], [job.draft_kv_len for job, _ in feeds],
                             [len(toks) for _, toks in feeds], page_size)
        rows = params.last_token_index if want_logits else params.last_token_index[:0]
        out = packed_forward(self.model, self.cache, ids, params, rows)
        for job, toks in feeds:
            job.draft_kv_len += len(toks)
        return out

    def draft(self, budgets: list[tuple], page_size: int) -> dict:
        """Greedy drafts {job: tokens} for (job, k) pairs: the first forward brings each job's draft cache up to
        its sequence, then one forward per further draft token; jobs stop at their own k."""
        drafts = {job: [] for job, _ in budgets}
        live = [(job, k) for job, k in budgets if k > 0]
        feeds = {job: job.sequence[job.draft_kv_len:] for job, _ in live}
        while live:
            logits = self.forward([(job, feeds[job]) for job, _ in live], page_size, True)
            tokens = logits[:, :self.vocab].argmax(dim=-1).tolist()
            for (job, _), t in zip(live, tokens):
                drafts[job].append(t)
                feeds[job] = [t]
            live = [(job, k) for job, k in live if len(drafts[job]) < k]
        return drafts
