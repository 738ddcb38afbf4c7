"""Randomized fuzz of the generators' invariance rule and robustness.

The rule: "the same request gives the same tokens alone or among others (greedy or seeded)". Each round builds a
random mix of 1..8 jobs for ExLlamaV2DynamicGenerator (prompt lengths across page boundaries and longer than
max_chunk_size, prefix-sharing prompts, greedy and seeded sampling with random settings, stop tokens / strings,
banned strings, a filter, jobs enqueued while others run, one job cancelled mid-run, caches small enough to make
jobs wait or be preempted) and checks every job's tokens, text and end reason against the same job run alone in a
fresh generator of the same configuration. A cancelled job's released tokens must be a prefix of its lone run.
Every round also checks the page table is empty once the queue drains, and (for a few jobs) that the streaming
generator and generate_simple (single and batched prompts) give the dynamic generator's tokens. A robustness pass
sends bad requests and checks each is refused with an error naming the parameter, and that the generator keeps
serving afterwards.

    python bench/fuzz_generator.py --seed 0 --rounds 20 --model tiny
    python bench/fuzz_generator.py --seed 1 --rounds 5 --model smollm2

One line per round; a mismatch report (with the round's seed and the job's request) for each mismatch; exit code
1 on any mismatch.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config, ExLlamaV2Tokenizer
from exllamav2.generator import ExLlamaV2Sampler
from exllamav2.generator.dynamic import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob

WORDS = ("the cat sat on a mat while seven old dogs ran home . why is the sky blue ? tell me about rivers , "
         "mountains and quiet towns near the sea ; numbers like 12 and 345 appear too ! hello world").split()

# --------------------------------------------------------------------------------------------------- models


def build_tiny_dir(path: str) -> str:
    """A 2-layer random Llama (fp32) with SmolLM2's tokenizer, so text, stop strings and filters work."""
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    from transformers import LlamaConfig, LlamaForCausalLM

    from exllamav2.default_models import smollm2_gguf_path
    from exllamav2.tokenizer.gguf_tokenizer import save_hf_tokenizer_files, tokenizer_from_gguf

    info = tokenizer_from_gguf(smollm2_gguf_path())
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                      rms_norm_eps=1e-5, bos_token_id=info.bos_token_id, eos_token_id=info.eos_token_id,
                      tie_word_embeddings=True)
    torch.manual_seed(3)
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.2) if p.dim() > 1 else p.normal_(1.0, 0.05)
    os.makedirs(path, exist_ok=True)
    hf.save_pretrained(path, safe_serialization=True)
    save_hf_tokenizer_files(info, path)
    return path


def load_model(name: str, tiny_dir: str | None = None):
    """(model, tokenizer, max_seq_len) for 'tiny' (random fp32) or 'smollm2' (the GGUF, default weights)."""
    if name == "tiny":
        d = build_tiny_dir(tiny_dir or "/tmp/fuzz_gen/tiny_model")
        cfg = ExLlamaV2Config(d)
        cfg.dtype = "float32"
    elif name == "smollm2":
        from exllamav2.default_models import smollm2_gguf_path
        cfg = ExLlamaV2Config(smollm2_gguf_path())
    else:
        raise ValueError(f"--model must be tiny or smollm2, got {name!r}")
    cfg.max_seq_len = 1024
    model = ExLlamaV2(cfg)
    model.load()
    return model, ExLlamaV2Tokenizer(cfg)


# --------------------------------------------------------------------------------------------------- requests


@dataclass
class Request:
    """Everything needed to build the same job twice."""
    ids: list[int]
    max_new_tokens: int
    min_new_tokens: int = 0
    settings: dict = field(default_factory=dict)  # Settings fields; "greedy": True for Settings.greedy()
    bias: list[tuple[int, float]] = field(default_factory=list)
    seed: int | None = None
    stop_conditions: list = field(default_factory=list)
    banned_strings: list[str] = field(default_factory=list)
    select_filter: list[str] | None = None
    return_probs: bool = False
    enqueue_step: int = 0
    cancel_step: int | None = None

    def gen_settings(self, tokenizer) -> ExLlamaV2Sampler.Settings:
        kw = dict(self.settings)
        s = ExLlamaV2Sampler.Settings.greedy() if kw.pop("greedy", False) else ExLlamaV2Sampler.Settings()
        for k, v in kw.items():
            setattr(s, k, v)
        if self.bias:
            n = tokenizer.get_vocab_size()
            s.token_bias = torch.zeros(n + (-n % 32))
            for t, b in self.bias:
                s.token_bias[t] = b
        return s

    def job(self, model, tokenizer, identifier=None) -> ExLlamaV2DynamicJob:
        filters = None
        if self.select_filter:
            from exllamav2.generator.filters import ExLlamaV2SelectFilter
            filters = [ExLlamaV2SelectFilter(model, tokenizer, self.select_filter)]
        return ExLlamaV2DynamicJob(torch.tensor([self.ids]), self.max_new_tokens, self.min_new_tokens,
                                   gen_settings=self.gen_settings(tokenizer), seed=self.seed,
                                   stop_conditions=list(self.stop_conditions), banned_strings=list(self.banned_strings),
                                   filters=filters, return_probs=self.return_probs, identifier=identifier)

    def short(self) -> str:
        d = {k: v for k, v in self.__dict__.items() if v not in (None, [], {}, False, 0) or k in ("max_new_tokens",)}
        d["ids"] = f"<{len(self.ids)} ids: {self.ids[:6]}...>"
        return repr(d)


@dataclass
class GenConfig:
    page_size: int
    pages: int
    max_chunk_size: int
    max_batch_size: int

    def make(self, model, tokenizer) -> ExLlamaV2DynamicGenerator:
        cache = ExLlamaV2Cache(model, 1, self.pages * self.page_size)
        return ExLlamaV2DynamicGenerator(model, cache, tokenizer, page_size=self.page_size,
                                         max_chunk_size=self.max_chunk_size, max_batch_size=self.max_batch_size)


def random_text_ids(rng: random.Random, tokenizer, n_tokens: int) -> list[int]:
    words = [rng.choice(WORDS) for _ in range(max(1, n_tokens))]
    ids = tokenizer.encode(" ".join(words))[0].tolist()
    while len(ids) < n_tokens:
        ids += ids
    return ids[:n_tokens]


def random_settings(rng: random.Random, tokenizer) -> tuple[dict, list, int | None]:
    """(settings fields, token bias entries, seed)."""
    vocab = tokenizer.get_vocab_size()
    bias = []
    if rng.random() < 0.25:
        bias = [(rng.randrange(vocab), rng.choice([-100.0, -5.0, 3.0, 8.0])) for _ in range(rng.randint(1, 6))]
    if rng.random() < 0.4:
        s = {"greedy": True}
        if rng.random() < 0.4:
            s["token_repetition_penalty"] = rng.choice([1.05, 1.3])
        if rng.random() < 0.2:
            s["token_frequency_penalty"] = rng.choice([0.1, 0.5])
        if rng.random() < 0.2:
            s["token_presence_penalty"] = rng.choice([0.2, 1.0])
        return s, bias, None
    s = {"temperature": rng.choice([0.3, 0.7, 1.0, 1.3]),
         "top_k": rng.choice([0, 0, 5, 40, 200]),
         "top_p": rng.choice([0.0, 0.5, 0.9, 1.0]),
         "min_p": rng.choice([0.0, 0.0, 0.02, 0.1]),
         "typical": rng.choice([0.0, 0.0, 0.5, 0.9]),
         "token_repetition_penalty": rng.choice([1.0, 1.0, 1.025, 1.2]),
         "token_frequency_penalty": rng.choice([0.0, 0.0, 0.3]),
         "token_presence_penalty": rng.choice([0.0, 0.0, 0.4])}
    # the rarer stages, each switched on with its probability (in this order: a seed's draws stay the same)
    for p, extra in ((0.15, {"tfs": 0.9}), (0.15, {"top_a": 0.1}), (0.15, {"temperature_last": True}),
                     (0.1, {"dry_multiplier": 0.8}), (0.1, {"xtc_probability": 0.5}), (0.1, {"mirostat": True}),
                     (0.1, {"min_temp": 0.5, "max_temp": 1.5}), (0.1, {"smoothing_factor": 0.3})):
        if rng.random() < p:
            s.update(extra)
    return s, bias, rng.randrange(2**31)


def random_round(rng: random.Random, tokenizer, max_seq_len: int) -> tuple[GenConfig, list[Request]]:
    page_size = rng.choice([16, 32, 64])
    chunk = rng.choice([8, 24, 64, 256, 2048])
    n_jobs = rng.randint(1, 8)
    eos = list(tokenizer.eos_token_ids or [tokenizer.eos_token_id])
    shared = random_text_ids(rng, tokenizer, rng.choice([page_size, 2 * page_size + 3, 3 * page_size]))
    reqs = []
    for _ in range(n_jobs):
        n = rng.choice([1, 2, 5, page_size - 1, page_size, page_size + 1, 2 * page_size, 3 * page_size + 7,
                        chunk + 5, rng.randint(1, 200)])
        n = max(1, min(n, 300))
        ids = random_text_ids(rng, tokenizer, n)
        if rng.random() < 0.35:  # shares a prefix with the other jobs (page dedup)
            ids = shared + (ids[:rng.randint(0, 20)] if rng.random() < 0.8 else [])
        settings, bias, seed = random_settings(rng, tokenizer)
        r = Request(ids, max_new_tokens=rng.choice([1, 2, 8, 17, 40, page_size + 3]), settings=settings, bias=bias,
                    seed=seed)
        if rng.random() < 0.2:
            r.min_new_tokens = rng.randint(0, r.max_new_tokens)
        if rng.random() < 0.5:
            r.stop_conditions = list(eos)
        if rng.random() < 0.3:
            r.stop_conditions.append(rng.randrange(tokenizer.get_vocab_size()))
        if rng.random() < 0.3:
            r.stop_conditions.append(rng.choice(["e", ".", "the", "\n", "ing", " a", "s t"]))
        if rng.random() < 0.25:
            r.banned_strings = rng.sample(["e", "a", "the", " s", "in", "o", "and", ".", " 1", ", ", "!"],
                                          rng.randint(1, 2))
        if rng.random() < 0.08 and not r.banned_strings:
            r.select_filter = rng.choice([["yes", "no"], ["apple pie", "banana", "cherry tart"]])
        r.return_probs = rng.random() < 0.3
        if rng.random() < 0.3:
            r.enqueue_step = rng.randint(1, 12)
        reqs.append(r)
    if n_jobs > 1 and rng.random() < 0.4:
        rng.choice(reqs).cancel_step = rng.randint(1, 10)
    # cache: sometimes barely enough for the largest job (jobs wait / get preempted), sometimes roomy
    longest = max(-(-(len(r.ids) + r.max_new_tokens) // page_size) for r in reqs)
    pages = longest + rng.choice([0, 1, 2, 4, 40])
    pages = min(max(pages, 1), max_seq_len // page_size)
    return GenConfig(page_size, pages, chunk, rng.choice([1, 2, 3, 8, 16])), reqs


# --------------------------------------------------------------------------------------------------- running


@dataclass
class Outcome:
    tokens: list[int]
    text: str
    eos_reason: str | None
    probs: list[float] | None
    job_tokens: list[int]
    job_text: str
    finished: bool
    error: str | None = None


def run_jobs(model, tokenizer, config: GenConfig, reqs: list[Request], max_steps: int = 20000):
    """Run the requests in one generator, enqueueing and cancelling at their steps. Returns ({index: Outcome},
    generator, problems list)."""
    gen = config.make(model, tokenizer)
    jobs = {}
    tokens: dict[int, list[int]] = {}
    text: dict[int, str] = {}
    probs: dict[int, list[float]] = {}
    reasons: dict[int, str] = {}
    problems: list[str] = []
    step = 0
    while True:
        for i, r in enumerate(reqs):
            if i not in jobs and r.enqueue_step <= step:
                jobs[i] = r.job(model, tokenizer, identifier=i)
                gen.enqueue(jobs[i])
                tokens[i], text[i], probs[i] = [], "", []
            if i in jobs and r.cancel_step is not None and r.cancel_step == step and not jobs[i].finished:
                gen.cancel(jobs[i])
                reasons[i] = "cancelled"
        if len(jobs) == len(reqs) and not gen.num_remaining_jobs():
            break
        if step >= max_steps:
            problems.append(f"no progress: {gen.num_remaining_jobs()} jobs still queued after {max_steps} steps")
            break
        for res in gen.iterate():
            i = res["identifier"]
            if res["stage"] != "streaming":
                continue
            if i in reasons and reasons[i] != "cancelled":
                problems.append(f"job {i}: result after its eos")
            tokens[i] += res["token_ids"].flatten().tolist()
            text[i] += res["text"]
            if "token_probs" in res:
                probs[i] += res["token_probs"].flatten().tolist()
            if res["eos"]:
                reasons[i] = res["eos_reason"]
                if res["new_tokens"] != len(jobs[i].new_token_ids) or res["full_completion"] != jobs[i].full_completion:
                    problems.append(f"job {i}: eos result disagrees with the job ({res['new_tokens']} new tokens)")
        step += 1
    if gen.page_table.num_used_pages():
        problems.append(f"{gen.page_table.num_used_pages()} pages still referenced after the queue drained")
    out = {i: Outcome(tokens[i], text[i], reasons.get(i), probs[i] if reqs[i].return_probs else None,
                      list(jobs[i].new_token_ids), jobs[i].full_completion, jobs[i].finished) for i in jobs}
    return out, gen, problems


def compare(i: int, r: Request, crowd: Outcome, alone: Outcome) -> list[str]:
    bad = []
    if r.cancel_step is not None and crowd.eos_reason == "cancelled":
        if crowd.tokens != alone.tokens[:len(crowd.tokens)]:
            bad.append(f"job {i} (cancelled): released tokens {crowd.tokens} are not a prefix of alone {alone.tokens}")
        if not alone.text.startswith(crowd.text):
            bad.append(f"job {i} (cancelled): released text {crowd.text!r} not a prefix of alone {alone.text!r}")
        return bad
    if crowd.tokens != alone.tokens:
        k = next((j for j, (a, b) in enumerate(zip(crowd.tokens, alone.tokens)) if a != b),
                 min(len(crowd.tokens), len(alone.tokens)))
        bad.append(f"job {i}: tokens differ at new token {k}: crowd {crowd.tokens[k:k + 6]} (of {len(crowd.tokens)}) "
                   f"vs alone {alone.tokens[k:k + 6]} (of {len(alone.tokens)})")
    if crowd.text != alone.text:
        k = next((j for j, (a, b) in enumerate(zip(crowd.text, alone.text)) if a != b),
                 min(len(crowd.text), len(alone.text)))
        bad.append(f"job {i}: text differs at char {k}: crowd {crowd.text[max(0, k - 20):k + 40]!r} vs alone "
                   f"{alone.text[max(0, k - 20):k + 40]!r}")
    if crowd.eos_reason != alone.eos_reason:
        bad.append(f"job {i}: eos_reason crowd {crowd.eos_reason} vs alone {alone.eos_reason}")
    if crowd.probs is not None and alone.probs is not None and crowd.tokens == alone.tokens \
            and crowd.probs != alone.probs:
        diff = max((abs(a - b) for a, b in zip(crowd.probs, alone.probs)), default=0.0)
        bad.append(f"job {i}: token_probs differ (max abs diff {diff:.3g})")
    for name, o in (("crowd", crowd), ("alone", alone)):
        if o.tokens != o.job_tokens:
            bad.append(f"job {i} ({name}): streamed token_ids {o.tokens[:8]} != job.new_token_ids {o.job_tokens[:8]}")
        if o.text != o.job_text:
            bad.append(f"job {i} ({name}): streamed text != job.full_completion")
    return bad


def check_streaming(model, tokenizer, r: Request, alone: Outcome) -> list[str]:
    """The streaming generator, same request (no min_new_tokens / filters), gives the dynamic generator's tokens.
    Skipped where a stop string and a banned string overlap: the streaming generator checks stop strings before
    banned strings, the dynamic one after (both match banned strings case-insensitively, as the original does)."""
    stops = [c for c in r.stop_conditions if isinstance(c, str)]
    if any(a in b or b in a for a in stops for b in r.banned_strings):
        return []
    from exllamav2.generator.streaming import ExLlamaV2StreamingGenerator
    cache = ExLlamaV2Cache(model, 1, len(r.ids) + r.max_new_tokens + 8)
    sg = ExLlamaV2StreamingGenerator(model, cache, tokenizer)
    sg.set_stop_conditions(list(r.stop_conditions))
    sg.begin_stream_ex(torch.tensor([r.ids]), r.gen_settings(tokenizer), banned_strings=list(r.banned_strings),
                       max_new_tokens=r.max_new_tokens, seed=r.seed if r.seed is not None else 0)
    toks, text, reason = [], "", None
    for _ in range(r.max_new_tokens * 4 + 50):
        res = sg.stream_ex()
        toks += res["chunk_token_ids"].flatten().tolist()
        text += res["chunk"]
        if res["eos"]:
            reason = res.get("eos_reason")
            break
    bad = []
    # the streaming generator reports the stop token in chunk_token_ids? compare tokens up to the stop
    a_tokens = alone.tokens
    if alone.eos_reason == "stop_token" and toks == a_tokens[:-1]:
        toks = a_tokens
    if toks != a_tokens:
        bad.append(f"streaming: tokens {toks[:10]} (of {len(toks)}) vs dynamic alone {a_tokens[:10]} "
                   f"(of {len(a_tokens)})")
    if text != alone.text:
        k = next((j for j, (a, b) in enumerate(zip(text, alone.text)) if a != b), min(len(text), len(alone.text)))
        bad.append(f"streaming: text differs at char {k}: {text[max(0, k - 20):k + 40]!r} vs dynamic alone "
                   f"{alone.text[max(0, k - 20):k + 40]!r}")
    if reason != alone.eos_reason:
        bad.append(f"streaming: eos_reason {reason} vs dynamic {alone.eos_reason}")
    return bad


def check_generate_simple(model, tokenizer, rng: random.Random) -> list[str]:
    """generate_simple, greedy: each prompt of a left-padded batch equals the prompt alone; seeded single prompt
    equals the dynamic generator with the same seed."""
    from exllamav2.generator.base import ExLlamaV2BaseGenerator
    bad = []
    n = rng.randint(2, 4)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))) for _ in range(n)]
    num = rng.randint(1, 12)
    greedy = ExLlamaV2Sampler.Settings.greedy()
    gb = ExLlamaV2BaseGenerator(model, ExLlamaV2Cache(model, n, 256), tokenizer)
    batch = gb.generate_simple(prompts, greedy, num, stop_token=None, completion_only=True)
    g1 = ExLlamaV2BaseGenerator(model, ExLlamaV2Cache(model, 1, 256), tokenizer)
    for i, p in enumerate(prompts):
        alone = g1.generate_simple(p, greedy, num, stop_token=None, completion_only=True)
        if alone != batch[i]:
            bad.append(f"generate_simple batched row {i} (of {n}, prompt {len(tokenizer.encode(p)[0])} tokens) "
                       f"{batch[i]!r} vs alone {alone!r}")
    # seeded single prompt vs dynamic
    s, bias, seed = random_settings(rng, tokenizer)
    seed = seed if seed is not None else 1
    req = Request(tokenizer.encode(prompts[0])[0].tolist(), num, settings=s, bias=bias, seed=seed)
    out, _, _ = run_jobs(model, tokenizer, GenConfig(16, 16, 2048, 4), [req])
    simple = g1.generate_simple(prompts[0], req.gen_settings(tokenizer), num, seed=seed, stop_token=None,
                                completion_only=True)
    dyn_text = tokenizer.decode_list(out[0].tokens) if hasattr(tokenizer, "decode_list") else out[0].text
    if simple != dyn_text:
        bad.append(f"generate_simple seeded {simple!r} vs dynamic {dyn_text!r} (settings {s}, seed {seed})")
    return bad


# --------------------------------------------------------------------------------------------------- robustness


def robustness(model, tokenizer) -> list[str]:
    """Bad requests are refused with an error naming the parameter; the generator keeps serving afterwards."""
    S = ExLlamaV2Sampler.Settings
    ids = torch.tensor([tokenizer.encode("hello world, the cat sat")[0].tolist()])
    problems = []
    config = GenConfig(16, 8, 64, 4)
    good = Request(ids[0].tolist(), 6, settings={"greedy": True})
    ref, _, _ = run_jobs(model, tokenizer, config, [good])
    gen = config.make(model, tokenizer)

    def still_serves(label):
        job = good.job(model, tokenizer, identifier="probe")
        try:
            gen.enqueue(job)
            for _ in range(200):
                if job.finished:
                    break
                gen.iterate()
        except Exception as e:  # noqa: BLE001
            problems.append(f"{label}: the generator no longer serves a good job: {type(e).__name__}: {e}")
            gen.clear_queue()
            return
        if job.new_token_ids != ref[0].tokens:
            problems.append(f"{label}: a good job afterwards gave {job.new_token_ids} instead of {ref[0].tokens}")

    def settings(**kw):
        s = S.greedy() if kw.pop("greedy", False) else S()
        for k, v in kw.items():
            setattr(s, k, v)
        return s

    big = torch.tensor([[5] * (8 * 16)])
    cases = [
        ("max_new_tokens=-1", lambda: ExLlamaV2DynamicJob(ids, -1), "max_new_tokens"),
        ("max_new_tokens=0", lambda: ExLlamaV2DynamicJob(ids, 0), "max_new_tokens"),
        ("max_new_tokens=2.5", lambda: ExLlamaV2DynamicJob(ids, 2.5), "max_new_tokens"),
        ("max_new_tokens=None", lambda: ExLlamaV2DynamicJob(ids, None), "max_new_tokens"),
        ("min_new_tokens=-1", lambda: ExLlamaV2DynamicJob(ids, 4, -1), "min_new_tokens"),
        ("min_new_tokens > max", lambda: ExLlamaV2DynamicJob(ids, 4, 9), "min_new_tokens"),
        ("empty prompt", lambda: ExLlamaV2DynamicJob(torch.zeros((1, 0), dtype=torch.long), 4), "input_ids"),
        ("prompt as list", lambda: ExLlamaV2DynamicJob(ids[0].tolist(), 4), "input_ids"),
        ("1-d prompt", lambda: ExLlamaV2DynamicJob(ids[0], 4), "input_ids"),
        ("float prompt", lambda: ExLlamaV2DynamicJob(ids.float() + 0.5, 4), "input_ids"),
        ("prompt id >= vocab", lambda: ExLlamaV2DynamicJob(torch.tensor([[1, 2, 10**7]]), 4), "input_ids"),
        ("negative prompt id", lambda: ExLlamaV2DynamicJob(torch.tensor([[1, -3, 2]]), 4), "input_ids"),
        ("prompt longer than the cache", lambda: ExLlamaV2DynamicJob(big, 4), "prompt"),
        ("stop condition float", lambda: ExLlamaV2DynamicJob(ids, 4, stop_conditions=[1.5]), "stop condition"),
        ("stop condition None", lambda: ExLlamaV2DynamicJob(ids, 4, stop_conditions=[None]), "stop condition"),
        ("stop condition bytes", lambda: ExLlamaV2DynamicJob(ids, 4, stop_conditions=[b"x"]), "stop condition"),
        ("stop_conditions a bare str", lambda: ExLlamaV2DynamicJob(ids, 4, stop_conditions="the end"),
         "stop_conditions"),
        ("stop_conditions a bare int", lambda: ExLlamaV2DynamicJob(ids, 4, stop_conditions=2), "stop_conditions"),
        ("stop token id >= vocab", lambda: ExLlamaV2DynamicJob(ids, 4, stop_conditions=[10**7]), "stop"),
        ("banned_strings a bare str", lambda: ExLlamaV2DynamicJob(ids, 4, banned_strings="the"), "banned_strings"),
        ("banned_strings holding an int", lambda: ExLlamaV2DynamicJob(ids, 4, banned_strings=[5]), "banned_strings"),
        ("gen_settings a dict", lambda: ExLlamaV2DynamicJob(ids, 4, gen_settings={"top_p": 0.5}), "gen_settings"),
        ("return_top_tokens > vocab", lambda: ExLlamaV2DynamicJob(ids, 4, return_top_tokens=10**6),
         "return_top_tokens"),
        ("top_p=1.5", lambda: ExLlamaV2DynamicJob(ids, 4, gen_settings=settings(top_p=1.5)), "top_p"),
        ("top_p=-0.1", lambda: ExLlamaV2DynamicJob(ids, 4, gen_settings=settings(top_p=-0.1)), "top_p"),
        ("top_k=-1", lambda: ExLlamaV2DynamicJob(ids, 4, gen_settings=settings(top_k=-1)), "top_k"),
        ("min_p=2", lambda: ExLlamaV2DynamicJob(ids, 4, gen_settings=settings(min_p=2.0)), "min_p"),
        ("typical=-1", lambda: ExLlamaV2DynamicJob(ids, 4, gen_settings=settings(typical=-1.0)), "typical"),
        ("temperature=-1", lambda: ExLlamaV2DynamicJob(ids, 4, gen_settings=settings(temperature=-1.0)),
         "temperature"),
        ("temperature=nan", lambda: ExLlamaV2DynamicJob(ids, 4, gen_settings=settings(temperature=float("nan"))),
         "temperature"),
        ("repetition penalty 0", lambda: ExLlamaV2DynamicJob(
            ids, 4, gen_settings=settings(token_repetition_penalty=0.0)), "token_repetition_penalty"),
        ("repetition penalty -1", lambda: ExLlamaV2DynamicJob(
            ids, 4, gen_settings=settings(token_repetition_penalty=-1.0)), "token_repetition_penalty"),
        ("token_bias wrong length", lambda: ExLlamaV2DynamicJob(
            ids, 4, gen_settings=settings(token_bias=torch.zeros(7))), "token_bias"),
        ("token_bias all -inf", lambda: ExLlamaV2DynamicJob(
            ids, 4, gen_settings=settings(token_bias=torch.full((49152,), float("-inf")))), "no token can be sampled"),
        ("xtc_probability=2", lambda: ExLlamaV2DynamicJob(ids, 4, gen_settings=settings(xtc_probability=2.0)),
         "xtc_probability"),
    ]
    for label, make, name in cases:
        t0 = time.time()
        try:
            job = make()
        except (ValueError, TypeError, NotImplementedError) as e:
            if name.lower() not in str(e).lower():
                problems.append(f"{label}: refused at construction but the error does not name {name!r}: "
                                f"{type(e).__name__}: {e}")
            still_serves(label)
            continue
        except Exception as e:  # noqa: BLE001
            problems.append(f"{label}: constructor raised {type(e).__name__}: {e} (not a ValueError/TypeError)")
            still_serves(label)
            continue
        # accepted: enqueue it beside a good job and see what happens
        companion = good.job(model, tokenizer, identifier="companion")
        try:
            gen.enqueue(job)
        except (ValueError, TypeError) as e:
            if name.lower() not in str(e).lower():
                problems.append(f"{label}: refused at enqueue but the error does not name {name!r}: {e}")
            still_serves(label)
            continue
        except Exception as e:  # noqa: BLE001
            problems.append(f"{label}: enqueue raised {type(e).__name__}: {e}")
            still_serves(label)
            continue
        gen.enqueue(companion)
        errors = []
        for _ in range(300):
            if job.finished and companion.finished:
                break
            try:
                gen.iterate()
            except Exception as e:  # noqa: BLE001
                errors.append(f"{type(e).__name__}: {str(e)[:160]}")
                if len(errors) >= 3:
                    break
        dt = time.time() - t0
        if errors and len(errors) == 1 and job.finished and companion.finished \
                and companion.new_token_ids == ref[0].tokens and name.lower() in errors[0].lower():
            pass  # a failure only sampling can find: raised once, naming it; the job ended, the others went on
        elif errors:
            problems.append(f"{label}: accepted, then iterate() raised {errors[0]} "
                            f"({len(errors)} times; companion finished={companion.finished})")
            gen.clear_queue()
        elif not job.finished:
            problems.append(f"{label}: accepted and never finished")
            gen.clear_queue()
        else:
            problems.append(f"{label}: accepted silently (ran to {len(job.new_token_ids)} tokens, "
                            f"{job.full_completion[:30]!r}, {dt:.1f}s)")
            if companion.new_token_ids != ref[0].tokens:
                problems.append(f"{label}: the companion job's tokens changed")
        still_serves(label)
    if gen.page_table.num_used_pages():
        problems.append(f"robustness: {gen.page_table.num_used_pages()} pages leaked")
    return problems


# --------------------------------------------------------------------------------------------------- driver


def fuzz_round(model, tokenizer, seed: int, extras: bool = True, verbose: bool = False):
    """One round: returns (summary line, list of mismatch strings)."""
    rng = random.Random(seed)
    config, reqs = random_round(rng, tokenizer, model.config.max_seq_len)
    mism = []
    try:
        crowd, gen, problems = run_jobs(model, tokenizer, config, reqs)
    except Exception as e:  # noqa: BLE001
        tb = traceback.format_exc(limit=4)
        return f"round seed={seed}: CROWD RUN RAISED {type(e).__name__}: {e}", [f"crowd run raised: {tb}"], config, reqs
    mism += problems
    for i, r in enumerate(reqs):
        alone_r = Request(**{**r.__dict__, "enqueue_step": 0, "cancel_step": None})
        try:
            alone, _, p = run_jobs(model, tokenizer, config, [alone_r])
        except Exception as e:  # noqa: BLE001
            mism.append(f"job {i}: alone run raised {type(e).__name__}: {e}")
            continue
        mism += [f"job {i} alone: {x}" for x in p]
        got = compare(i, r, crowd[i], alone[0])
        mism += got
        if got:
            mism.append(f"  job {i} request: {r.short()}")
        if extras and i == 0 and not r.min_new_tokens and not r.select_filter and not got:
            mism += check_streaming(model, tokenizer, alone_r, alone[0])
    if extras and rng.random() < 0.3:
        mism += check_generate_simple(model, tokenizer, rng)
    line = (f"round seed={seed}: {len(reqs)} jobs, page {config.page_size}, pages {config.pages}, chunk "
            f"{config.max_chunk_size}, batch {config.max_batch_size}, preemptions {gen.num_preemptions}, cached "
            f"{gen.num_cached_tokens} -> {'MISMATCH' if mism else 'ok'}")
    return line, mism, config, reqs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    ap.add_argument("--no-extras", action="store_true", help="skip the streaming / generate_simple checks")
    ap.add_argument("--robustness", action="store_true", help="also run the bad-request pass")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-invariant", choices=["auto", "on", "off"], default="auto",
                    help="exllamav2.ops.set_batch_invariant: auto (the default: invariant wherever it is cheap, "
                         "every CPU kernel with the C++ kernels built), on (every kernel at any cost), off (the "
                         "fastest kernel per row count: dense prefill and large batches through oneDNN)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from exllamav2 import ops
    ops.set_batch_invariant({"auto": None, "on": True, "off": False}[args.batch_invariant])
    model, tokenizer = load_model(args.model)
    failed = 0
    t0 = time.time()
    for k in range(args.rounds):
        seed = args.seed * 100003 + k
        t = time.time()
        line, mism, config, reqs = fuzz_round(model, tokenizer, seed, extras=not args.no_extras)
        print(f"{line} ({time.time() - t:.1f}s)", flush=True)
        if mism:
            failed += 1
            print(f"  config: {config}")
            for m in mism:
                print(f"  {m}")
    if args.robustness:
        probs = robustness(model, tokenizer)
        # known and accepted: a stop token id past the vocabulary never matches (tokenizers may name ids the model
        # lacks, so it is not refused)
        notes = [p for p in probs if p.startswith("stop token id >= vocab")]
        probs = [p for p in probs if p not in notes]
        print(f"robustness: {len(probs)} problems")
        for p in probs:
            print(f"  {p}")
        for p in notes:
            print(f"  note: {p}")
        failed += bool(probs)
    print(f"{args.rounds} rounds, {failed} with mismatches, {time.time() - t0:.0f}s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
