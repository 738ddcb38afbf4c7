"""ExLlamaV2DynamicGenerator: continuous batching over a paged KV cache.

Jobs join and leave between steps. Every step is ONE model forward that packs the new tokens of all active
jobs into a single row (see paged_attn.py): one token per decoding job, plus prompt chunks of prefilling jobs up
to `max_chunk_size` tokens in all, so a long prompt is spread over several steps while the other streams keep
decoding. Pages are allocated as a job grows: its prompt's pages when it starts, then one page whenever its
next token crosses a page boundary; full prompt pages are shared between jobs through their prefix hashes
(dynamic_pages.py). A job is admitted when its prompt fits and leaves a page of headroom per running job; if it
does not fit, a running job holding more pages than it needs is preempted to make room. When a step needs more
pages than are free, the running job holding the most pages is preempted: its written pages are
published by prefix hash and released, and it goes back to the head of the queue; when it resumes it reuses
what was not recycled, recomputes the rest (prompt and generated tokens) and continues with the same sampler
state, so it yields exactly the tokens it would have. A job resumed this way is not preempted again before it
has written another page, so every job makes progress.

Per-job interventions (`ExLlamaV2DynamicJob(..., interventions=[...])`, see exllamav2.interventions) are
registered when the job starts and removed when it ends or is cancelled; each step tells the hooks which tokens
of the packed row belong to which job (`token_streams`), so a job's edits touch only its own tokens. With no
such job active, nothing is wrapped.

Speculative decoding (`draft_model=` with its own paged cache, or `use_ngram_draft=True`; dynamic_draft.py):
each decoding job proposes up to `num_draft_tokens` tokens, and the main model scores its last token and the
drafts in the step's packed forward, each position as its own one-token sequence over the job's pages, so it is
computed exactly as a plain decode step computes it (a decode-only step then still runs the compiled decode
runner when there is one). Each position is then sampled exactly as a
plain step would sample it (same sampler, filters, stop conditions and RNG draw), in order, and drafts are
accepted while the sampled token equals the draft; the first token that differs is kept and the rest dropped.
So the output is the plain job's output for greedy and for seeded sampling alike (with sampling fewer drafts
are accepted than a rejection-sampling scheme would accept). Rejected positions are rolled back: `kv_len` ends
at the last accepted token, so their K/V are overwritten before anything attends to them, and pages taken
only for them are released. Jobs with per-job interventions do not speculate (their edits address tokens by
step). Finished jobs report `accepted_draft_tokens` and `rejected_draft_tokens`.
"""

from __future__ import annotations

import time

import torch

from ..attn_params import PagedParams
from .dynamic_draft import DraftModel, NgramDraft, packed_forward
from .dynamic_job import ExLlamaV2DynamicJob
from .dynamic_pages import PageTable
from .dynamic_sampling import sample_step_on_device
from ..runtime.stack_chunk import fresh_stack_chunk
from .sampler import ExLlamaV2Sampler

__all__ = ["ExLlamaV2DynamicGenerator", "ExLlamaV2DynamicJob"]


class ExLlamaV2DynamicGenerator:
    def __init__(self, model, cache, tokenizer, max_batch_size: int | None = None, max_seq_len: int | None = None,
                 max_chunk_size: int | None = None, max_q_size: int = 8, draft_model=None, draft_cache=None,
                 num_draft_tokens: int = 4, use_ngram_draft: bool = False, max_ngram: int = 4,
                 max_sampling_threads: int = 16, min_sampling_threads: int = 3, paged: bool = True,
                 filter_background_eval: bool = True, page_size: int = 256, **kwargs):
        if kwargs:
            raise TypeError(f"ExLlamaV2DynamicGenerator: unexpected arguments {sorted(kwargs)}")
        if draft_model is not None and use_ngram_draft:
            raise ValueError("ExLlamaV2DynamicGenerator: use either draft_model or use_ngram_draft, not both")
        if draft_cache is not None and draft_model is None:
            raise ValueError("ExLlamaV2DynamicGenerator: draft_cache was given without a draft_model")
        if (draft_model is not None or use_ngram_draft) and (isinstance(num_draft_tokens, bool) or not isinstance(
                num_draft_tokens, int) or num_draft_tokens < 1):
            raise ValueError(f"ExLlamaV2DynamicGenerator: num_draft_tokens must be a positive int, got "
                             f"{num_draft_tokens!r}")
        if use_ngram_draft and (isinstance(max_ngram, bool) or not isinstance(max_ngram, int) or max_ngram < 1):
            raise ValueError(f"ExLlamaV2DynamicGenerator: max_ngram must be a positive int, got {max_ngram!r}")
        if not getattr(cache, "supports_paged", True):
            raise ValueError(f"ExLlamaV2DynamicGenerator does not support {type(cache).__name__} (no paged "
                             "attention reads it); use ExLlamaV2Cache or a quantized cache (cache_q.py)")
        if cache.batch_size != 1:
            raise ValueError(f"ExLlamaV2DynamicGenerator needs a cache with batch_size=1, got {cache.batch_size}")
        if page_size < 1 or cache.max_seq_len % page_size:
            raise ValueError(f"ExLlamaV2DynamicGenerator: cache.max_seq_len={cache.max_seq_len} must be a multiple "
                             f"of page_size={page_size}")
        cfg = model.config
        self.model, self.cache, self.tokenizer = model, cache, tokenizer
        self.page_size = page_size
        self.page_table = PageTable(cache.max_seq_len // page_size, page_size)
        self.max_seq_len = min(max_seq_len or cfg.max_seq_len, cfg.max_seq_len)
        self.max_batch_size = max_batch_size or max(1, cfg.max_input_len // max_q_size)
        self.max_chunk_size = max_chunk_size or cfg.max_input_len
        if self.max_chunk_size < 1 or self.max_batch_size < 1:
            raise ValueError("ExLlamaV2DynamicGenerator: max_chunk_size and max_batch_size must be positive")
        self.paged = paged
        self.draft = DraftModel(draft_model, draft_cache, model, cache) if draft_model is not None else None
        self.draft_model = draft_model
        self.draft_cache = self.draft.cache if self.draft else None
        self.use_ngram_draft = bool(use_ngram_draft)
        self.num_draft_tokens = num_draft_tokens
        self.max_ngram = max_ngram
        self.speculative = self.draft is not None or self.use_ngram_draft
        self.loras = None
        self.pending: list[ExLlamaV2DynamicJob] = []
        self.active: list[ExLlamaV2DynamicJob] = []
        self.job_serial = 0
        # counters over the generator's life: prompt tokens run through the model / taken from cached pages
        self.num_prefilled_tokens = 0
        self.num_cached_tokens = 0
        self.num_forwards = 0
        self.num_preemptions = 0
        self.num_drafted_tokens = 0
        self.num_accepted_draft_tokens = 0
        # plain sampled rows sample together on the logits' device (dynamic_sampling.py): None = when the logits
        # are on a GPU (on the CPU the per-row host path is faster), True / False = always / never
        self.device_sampling: bool | None = None
        self._carry: list[dict] = []  # results of a step that raised for one job, returned by the next iterate()

    # ------------------------------------------------------------------ queue

    def enqueue(self, job: ExLlamaV2DynamicJob | list[ExLlamaV2DynamicJob]) -> int | list[int]:
        if isinstance(job, list):
            return [self.enqueue(j) for j in job]
        if not isinstance(job, ExLlamaV2DynamicJob):
            raise TypeError(f"enqueue: expected an ExLlamaV2DynamicJob, got {type(job).__name__}")
        if job.generator is not None:
            raise ValueError("enqueue: this job was already enqueued")
        self.validate(job)
        job.prepare(self)
        job.serial = self.job_serial
        self.job_serial += 1
        self.pending.append(job)
        return job.serial

    def validate(self, job: ExLlamaV2DynamicJob) -> None:
        """Raise ValueError if the job can never run here; caps max_new_tokens at the context length."""
        if self.tokenizer is None:
            raise ValueError("enqueue: this ExLlamaV2DynamicGenerator was made without a tokenizer; a job needs one "
                             "to decode its text and match stop strings (pass an ExLlamaV2Tokenizer)")
        if job.prompt_len >= self.max_seq_len:
            raise ValueError(f"enqueue: the prompt has {job.prompt_len} tokens; the context holds "
                             f"max_seq_len={self.max_seq_len} (prompt plus at least one new token)")
        if job.prompt_len >= self.cache.max_seq_len:
            raise ValueError(f"enqueue: the prompt has {job.prompt_len} tokens but the cache holds "
                             f"{self.cache.max_seq_len} (prompt plus at least one new token)")
        vocab = self.model.config.vocab_size
        if vocab and (min(job.prompt_ids) < 0 or max(job.prompt_ids) >= vocab):
            raise ValueError(f"enqueue: input_ids holds token ids outside the model's vocabulary [0, {vocab}): "
                             f"{[t for t in job.prompt_ids if not 0 <= t < vocab][:8]}")
        if vocab and job.return_top_tokens > vocab:
            raise ValueError(f"enqueue: return_top_tokens={job.return_top_tokens} exceeds the vocabulary ({vocab})")
        job.gen_settings.validate(self.tokenizer.get_vocab_size(), name="gen_settings")
        # a job can grow until the context, or the whole cache, is full
        job.max_new_tokens = min(job.max_new_tokens, self.max_seq_len - job.prompt_len,
                                 self.cache.max_seq_len - job.prompt_len)
        job.min_new_tokens = min(job.min_new_tokens, job.max_new_tokens)
        if job.interventions and job.intervention_edits is None:
            from ..interventions import from_request

            specs = from_request(self.model, job.interventions, file_root=job.interventions_file_root)
            job.intervention_edits = [(s.point, s.build_edit(self.model, job.interventions_file_root), s.target())
                                      for s in specs]

    def cancel(self, job: ExLlamaV2DynamicJob) -> None:
        if job in self.pending:
            self.pending.remove(job)
        elif job in self.active:
            self._retire(job)
        job.finished = True

    def clear_queue(self) -> None:
        for job in list(self.pending) + list(self.active):
            self.cancel(job)

    def num_remaining_jobs(self) -> int:
        return len(self.pending) + len(self.active)

    def num_active_jobs(self) -> int:
        return len(self.active)

    def num_pending_jobs(self) -> int:
        return len(self.pending)

    def set_loras(self, loras) -> None:
        self.loras = loras if loras is None or isinstance(loras, list) else [loras]

    def warmup(self) -> None:
        pass

    def reset_page_table(self) -> None:
        if self.active:
            raise RuntimeError("reset_page_table: jobs are running")
        self.page_table.reset()

    def defrag_cache(self) -> None:
        """Pages are addressed through block tables, so fragmentation costs nothing here."""

    def _retire(self, job: ExLlamaV2DynamicJob) -> None:
        job.stop_interventions()
        self.active.remove(job)
        self.page_table.release(job.pages)
        job.pages = []

    def _admit(self, results: list) -> None:
        """Start pending jobs (resumed ones first, then in order) while their sequence fits in the free pages with
        a page of headroom per running job. A job that does not fit may be passed by later ones `max_skips`
        times; then admission waits for it."""
        blocked = None
        ps = self.page_size
        for job in list(self.pending):
            if len(self.active) >= self.max_batch_size:
                break
            hashes = job.reusable_hashes()
            need = -(-len(job.sequence) // ps)
            reused = self.page_table.match(hashes)[:need]
            free = self.page_table.num_free_pages() - sum(1 for p in reused if p.ref_count == 0)
            if need - len(reused) + len(self.active) > free and blocked is None:
                # a job that holds more pages than this one needs yields to it (see _make_room)
                if self._make_room(need - len(reused) + len(self.active) - 1 - free, need):
                    free = self.page_table.num_free_pages() - sum(1 for p in reused if p.ref_count == 0)
            if need - len(reused) + len(self.active) > free:
                if blocked is None:
                    blocked = job
                    if job.skips >= job.max_skips:
                        break
                continue
            if blocked is not None:
                if blocked.skips >= blocked.max_skips:
                    break
                blocked.skips += 1
            got = self.page_table.acquire(hashes, need)
            self.pending.remove(job)
            try:
                job.start_interventions(self.model)
            except BaseException:  # the specs were checked at enqueue, so this is a model that changed since
                self.page_table.release(got[0])
                job.finished = True
                raise
            job.pages, reused = got
            job.kv_len = reused * ps
            job.draft_kv_len = job.kv_len  # the draft cache is paged alike (stale draft K/V cost acceptance only)
            job.registered_pages = min(reused, len(job.prompt_page_hashes))
            self.num_cached_tokens += min(job.kv_len, job.prompt_len)
            self.active.append(job)
            if job.started:  # resumed after preemption
                job.protect_until = len(job.sequence) + ps
                continue
            job.cached_tokens = job.kv_len
            job.time_start = time.time()
            job.started = True
            for f in job.filters:
                f.begin("")
            results.append({"job": job, "stage": "started", "eos": False, "serial": job.serial,
                            "identifier": job.identifier})

    def _preempt(self, job: ExLlamaV2DynamicJob) -> None:
        """Take a running job's pages back; it waits at the head of the queue and resumes where it was."""
        job.stop_interventions()
        job.publish_pages(self.page_table)
        self.active.remove(job)
        self.page_table.release(job.pages)
        job.pages = []
        job.kv_len = 0
        job.draft_kv_len = 0
        job.registered_pages = 0
        job.skips = 0
        job.preemptions += 1
        self.num_preemptions += 1
        self.pending.insert(0, job)

    def _make_room(self, short: int, need: int) -> bool:
        """Preempt the running job holding the most pages if that frees `short` pages, it holds more than its
        share of the cache and at least twice the pages the waiting job needs: a long job lets short ones through
        instead of holding the cache until it ends. Jobs that resumed only recently are spared."""
        spare = [j for j in self.active if len(j.sequence) >= j.protect_until]
        if not spare:
            return False
        victim = max(spare, key=lambda j: (len(j.pages), j.serial))
        held = len(victim.pages)
        if held < 2 * need or held < short or held * (len(self.active) + 1) <= self.page_table.num_pages:
            return False
        self._preempt(victim)
        return True

    def _victim(self) -> ExLlamaV2DynamicJob | None:
        """The running job to preempt: the one holding the most pages (the newest among equals), sparing jobs
        that resumed only recently while another can go."""
        if not self.active:
            return None
        spare = [j for j in self.active if len(j.sequence) >= j.protect_until] or self.active
        return max(spare, key=lambda j: (len(j.pages), j.serial))

    def _draft_budget(self, job: ExLlamaV2DynamicJob) -> int:
        """Draft tokens a decoding job may verify this step: never more than it may still generate after the
        token the step samples anyway."""
        if not self.speculative or job.intervention_edits:
            return 0
        return max(0, min(self.num_draft_tokens, job.max_new_tokens - len(job.new_token_ids) - 1))

    def _plan(self, speculate: bool = True) -> list:
        """(job, number of new tokens, wants logits) for this step: one token per decoding job (plus room for
        its drafts when speculating), prompt chunks up to max_chunk_size in all."""
        segments = []
        budget = self.max_chunk_size
        for job in self.active:
            left = job.remaining_input()
            if left == 1:
                segments.append((job, 1 + (self._draft_budget(job) if speculate else 0), True))
            elif budget > 0:
                n = min(left, budget)
                budget -= n
                segments.append((job, n, job.kv_len + n == len(job.sequence)))
        return segments

    def _grow(self) -> list:
        """The step's segments, every job holding the pages its new tokens go to; preempts while pages are short."""
        while True:
            segments = self._plan()
            short = sum(job.pages_needed(job.kv_len + n, self.page_size) for job, n, _ in segments)
            if short <= self.page_table.num_free_pages():
                break
            if self.speculative:  # drafts wait rather than push a job out of the cache
                segments = self._plan(speculate=False)
                short = sum(job.pages_needed(job.kv_len + n, self.page_size) for job, n, _ in segments)
                if short <= self.page_table.num_free_pages():
                    break
            if len(self.active) < 2:  # cannot happen: validate() caps every job at the cache's size
                raise RuntimeError("the dynamic generator ran out of cache pages with no job to preempt")
            self._preempt(self._victim())
        for job, n, _ in segments:
            more = job.pages_needed(job.kv_len + n, self.page_size)
            if more:
                job.pages += self.page_table.allocate(more)
        return segments

    # ------------------------------------------------------------------ stepping

    @fresh_stack_chunk
    def iterate(self) -> list[dict]:
        """Run one step: admit what fits, one packed forward over all active jobs, sample. Returns result dicts."""
        results, self._carry = self._carry, []
        self._admit(results)
        if not self.active:
            return results
        segments = self._grow()
        if not segments:
            return results
        drafts = self._make_drafts(segments)
        # a decoding job feeds its last token and the drafts it got (the plan made room for num_draft_tokens)
        decoding = {job for job, _, _ in segments if job.remaining_input() == 1}
        segments = [(job, 1 + len(drafts.get(job, ())) if job in decoding else n, w) for job, n, w in segments]

        ids = torch.tensor([t for job, n, _ in segments
                            for t in job.sequence[job.kv_len:job.kv_len + n] + drafts.get(job, [])],
                           dtype=torch.long).unsqueeze(0)
        # a verified draft enters as one single-token sequence per position over the same pages (all K/V are
        # written before any sequence attends): each position is computed exactly as a plain decode step would
        # compute it, so accepting a draft never changes a token (one query block of 1 + k rows would reduce
        # the attention in another order)
        seq_jobs, tables, pasts, q_lens, ahead = [], [], [], [], []
        rows: list[int] = []  # packed tokens whose logits are sampled: the last of each, all of a verified draft
        start = 0
        for job, n, want in segments:
            split = job in drafts
            for i in range(n) if split else [0]:
                seq_jobs.append(job)
                tables.append(job.pages)
                pasts.append(job.kv_len + i)
                q_lens.append(1 if split else n)
                # a prompt prefilled in chunks: length-dependent RoPE takes the whole prompt's length for each chunk
                ahead.append(0 if split else max(0, job.prompt_len - job.kv_len - n))
            if want:
                rows.extend(range(start, start + n) if split else [start + n - 1])
            start += n
        params = PagedParams(tables, pasts, q_lens, self.page_size)
        params.rope_ahead_of = ahead
        rows_t = torch.tensor(rows, dtype=torch.long)
        if any(job.intervention_group is not None for job, _, _ in segments):
            from ..interventions import TokenStreams, token_streams

            streams = TokenStreams.from_paged(params, seq_jobs, [job.prompt_len for job in seq_jobs])
            with token_streams(self.model, streams):
                logits = self._forward(ids, params, rows_t)
        else:
            logits = self._forward(ids, params, rows_t)
        self.num_forwards += 1

        mirror = []  # the draft model writes its K/V for the tokens the main model just took in
        for job, n, _ in segments:
            prompt_part = max(0, min(job.kv_len + n, job.prompt_len) - job.kv_len)
            self.num_prefilled_tokens += prompt_part
            if self.draft is not None and job not in drafts and job.draft_kv_len == job.kv_len \
                    and not job.intervention_edits:
                mirror.append((job, job.sequence[job.kv_len:job.kv_len + n]))
            job.kv_len += 1 if job in drafts else n  # a verified job's drafts count once accepted (_verify)
            job.register_full_pages(self.page_table)
            if job.kv_len < len(job.sequence):
                cur, total = job.progress()
                results.append({"job": job, "stage": "prefill", "eos": False, "serial": job.serial,
                                "identifier": job.identifier, "curr_progress": cur, "max_progress": total})
        if mirror:
            self.draft.forward(mirror, self.page_size, False)

        on_device = self.device_sampling if self.device_sampling is not None else \
            logits is not None and logits.device.type != "cpu"
        presampled = sample_step_on_device(segments, drafts, logits, self.tokenizer) if on_device else {}
        row = 0
        failed = None
        for job, n, want in segments:
            if not want:
                continue
            rows_of_job = n if job in drafts else 1
            try:
                if job in drafts:
                    results.append(self._verify(job, logits[row:row + n], drafts[job]))
                else:
                    results.append(self._sample(job, logits[row:row + 1], presampled.get(job)))
            except Exception as e:  # noqa: BLE001 -- one job's failure must not stall the others
                # the job cannot go on (every token masked, a filter that raised, ...): it ends here, the other
                # jobs of the step are still sampled, and the error is raised once the step is complete
                self.cancel(job)
                failed = failed or (job, e)
                row += rows_of_job
                continue
            row += rows_of_job
            if job.finished:
                self._retire(job)
            elif self.speculative and job in decoding:  # pages taken only for drafts that were not accepted
                keep = -(-job.kv_len // self.page_size)
                if len(job.pages) > keep:
                    self.page_table.release(job.pages[keep:])
                    del job.pages[keep:]
        if failed is not None:
            job, e = failed
            self._carry = results  # the other jobs' results of this step come with the next iterate()
            msg = f"job {job.serial} (identifier {job.identifier!r}) was cancelled: {e}"
            try:
                err = type(e)(msg)
            except Exception:  # noqa: BLE001 -- an exception type with another signature
                err = RuntimeError(msg)
            raise err from e
        return results

    def _make_drafts(self, segments: list) -> dict:
        """{job: draft tokens} for the decoding jobs given room for drafts; jobs without a draft are left out."""
        budgets = [(job, n - 1) for job, n, _ in segments if n > 1 and job.remaining_input() == 1]
        if not budgets:
            return {}
        if self.draft is not None:
            drafts = self.draft.draft(budgets, self.page_size)
        else:
            drafts = {}
            for job, k in budgets:
                if job.ngram is None:
                    job.ngram = NgramDraft(self.max_ngram)
                drafts[job] = job.ngram.draft(job.sequence, k)
        drafts = {job: d for job, d in drafts.items() if d}
        self.num_drafted_tokens += sum(len(d) for d in drafts.values())
        return drafts

    def _forward(self, ids: torch.Tensor, params: PagedParams, rows: torch.Tensor) -> torch.Tensor | None:
        """The main model's packed forward (dynamic_draft.packed_forward); only `rows` of the packed tokens go
        through the head. Returns (len(rows), vocab), or None without rows."""
        return packed_forward(self.model, self.cache, ids, params, rows, self.loras)

    def _sample_step(self, job: ExLlamaV2DynamicJob, logits: torch.Tensor,
                     presampled: tuple[int, float] | None = None) -> tuple[int, dict]:
        """Sample one token from (1, vocab) logits (or take the (token, prob) sampled on the device) and append it
        to the job: (token, the step's result fields)."""
        if presampled is None:
            history = torch.tensor([job.sequence], dtype=torch.long) if job.needs_history() else None
            token, top_tokens, top_probs, prob, end_filter = ExLlamaV2Sampler.sample(
                logits.unsqueeze(0), job.gen_settings, history, job.rng.random(), self.tokenizer,
                return_top_tokens=job.return_top_tokens, blocked_tokens=job.blocked_tokens() or None,
                filters=job.filters or None, filter_prefer_eos=job.filter_prefer_eos)
            t, p = int(token[0, 0]), float(prob[0, 0])
        else:  # no filters and no top tokens on this path (dynamic_sampling.samples_on_device)
            (t, p), end_filter = presampled, False
        extras: dict = {"prob": p}
        if job.return_top_tokens:
            extras["top_tokens"], extras["top_probs"] = top_tokens[0, 0].cpu(), top_probs[0, 0].cpu()
        if job.return_logits:
            extras["logits"] = logits[0].cpu()
        if job.return_logprobs is not None:
            lp = torch.log_softmax(logits[0].float(), dim=-1)
            k = min(int(job.return_logprobs), lp.shape[-1])
            top = lp.topk(k) if k > 0 else None
            extras["logprob"] = float(lp[t])
            extras["top_logprobs"] = list(zip(top.indices.tolist(), top.values.tolist())) if top else []
        for f in job.filters:
            f.feed(t)
        step = job.accept_token(t, extras)
        if end_filter and not step["eos"]:
            step = _merge_steps([step, job.finish_with("end_filter")])
        return t, step

    def _sample(self, job: ExLlamaV2DynamicJob, logits: torch.Tensor,
                presampled: tuple[int, float] | None = None) -> dict:
        return self._result(job, self._sample_step(job, logits, presampled)[1])

    def _verify(self, job: ExLlamaV2DynamicJob, logits: torch.Tensor, draft: list[int]) -> dict:
        """Sample the positions of a verified draft in order, as plain steps would, accepting draft tokens while
        the sampled token equals the draft; the first sample that differs ends the step (and is kept). `logits`
        holds 1 + len(draft) rows: after the job's last token, then after each draft token."""
        steps = []
        accepted = 0
        for i in range(len(draft) + 1):
            length = len(job.sequence)
            t, step = self._sample_step(job, logits[i:i + 1])
            steps.append(step)
            if job.finished or len(job.sequence) != length + 1 or i == len(draft) or t != draft[i]:
                break  # ended, rewound by a banned string, or the draft is wrong from here on
            accepted += 1
            job.kv_len += 1  # the K/V written for draft[i] are those of the token now at that position
        job.accepted_draft_tokens += accepted
        job.rejected_draft_tokens += len(draft) - accepted
        self.num_accepted_draft_tokens += accepted
        job.draft_kv_len = min(job.draft_kv_len, job.kv_len)
        return self._result(job, _merge_steps(steps))

    def _result(self, job: ExLlamaV2DynamicJob, step: dict) -> dict:
        ex = step.pop("extras")
        r = {"job": job, "stage": "streaming", "serial": job.serial, "identifier": job.identifier, **step,
             "token_ids": torch.tensor([step["token_ids"]], dtype=torch.long)}
        if job.return_probs:
            r["token_probs"] = torch.tensor([[e["prob"] for e in ex]], dtype=torch.float)
        if job.return_top_tokens:
            k = job.return_top_tokens
            r["top_k_tokens"] = torch.stack([e["top_tokens"] for e in ex]).unsqueeze(0) if ex else \
                torch.zeros(1, 0, k, dtype=torch.long)
            r["top_k_probs"] = torch.stack([e["top_probs"] for e in ex]).unsqueeze(0) if ex else \
                torch.zeros(1, 0, k)
        if job.return_logits and ex:
            r["logits"] = torch.stack([e["logits"] for e in ex]).unsqueeze(0)
        if job.return_logprobs is not None:
            r["logprobs"] = [{"token": tid, "logprob": e["logprob"], "top_logprobs": e["top_logprobs"]}
                             for tid, e in zip(step["token_ids"], ex)]
        if step["eos"]:
            r.update({"full_completion": job.full_completion, "new_tokens": len(job.new_token_ids),
                      "prompt_tokens": job.prompt_len, "cached_tokens": job.cached_tokens, **job.timings()})
            if self.speculative:
                r.update({"accepted_draft_tokens": job.accepted_draft_tokens,
                          "rejected_draft_tokens": job.rejected_draft_tokens})
        return r

    # ------------------------------------------------------------------ blocking API

    def generate(self, prompt: str | list[str], max_new_tokens: int, min_new_tokens: int = 0, seed: int | None = None,
                 gen_settings=None, token_healing: bool = False, encode_special_tokens: bool = False,
                 decode_special_tokens: bool = False, stop_conditions: list | None = None, add_bos: bool = False,
                 abort_event=None, completion_only: bool = False, filters=None, filter_prefer_eos: bool = False,
                 return_last_results: bool = False, embeddings=None, banned_strings: list[str] | None = None,
                 **kwargs):
        """Blocking generation of one prompt (returns str) or a batch (list[str]). `stop_conditions=None` stops
        at the tokenizer's EOS ids. Runs the whole queue, so call it when no other jobs are pending."""
        if isinstance(prompt, tuple):
            raise NotImplementedError("generate: CFG (a tuple prompt) is not supported")
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        settings = gen_settings if isinstance(gen_settings, list) else [gen_settings] * len(prompts)
        if len(settings) != len(prompts):
            raise ValueError("generate: gen_settings must be one Settings or one per prompt")
        if stop_conditions is None:
            stop_conditions = list(self.tokenizer.eos_token_ids)
        jobs = []
        for i, (p, s) in enumerate(zip(prompts, settings)):
            ids = self.tokenizer.encode(p, add_bos=add_bos, encode_special_tokens=encode_special_tokens)
            jobs.append(ExLlamaV2DynamicJob(
                ids, max_new_tokens, min_new_tokens, gen_settings=s, seed=None if seed is None else seed + i,
                stop_conditions=stop_conditions, decode_special_tokens=decode_special_tokens,
                filters=filters if single else None, filter_prefer_eos=filter_prefer_eos, token_healing=token_healing,
                identifier=i, banned_strings=banned_strings, embeddings=embeddings, **kwargs))
        self.enqueue(jobs)
        last: dict = {}
        outputs = [""] * len(jobs)
        while any(not j.finished for j in jobs):
            if abort_event is not None and abort_event.is_set():
                for j in jobs:
                    self.cancel(j)
                break
            for r in self.iterate():
                if r["stage"] == "streaming" and r["eos"] and r["job"] in jobs:
                    last[r["identifier"]] = r
        for i, j in enumerate(jobs):
            outputs[i] = j.full_completion if completion_only else prompts[i] + j.full_completion
        out = outputs[0] if single else outputs
        if return_last_results:
            lr = [last.get(i) for i in range(len(jobs))]
            return out, (lr[0] if single else lr)
        return out


def _merge_steps(steps: list[dict]) -> dict:
    """One step's result fields from several sampled tokens (the last one decides eos and its reason)."""
    if len(steps) == 1:
        return steps[0]
    return {**steps[-1], "text": "".join(st["text"] for st in steps),
            "token_ids": [t for st in steps for t in st["token_ids"]],
            "extras": [e for st in steps for e in st["extras"]]}
