"""The engines the CPU benchmark times (bench/decode_benchmark.py runs and reports them): our seed-API loop, HF
transformers and llama.cpp driven by the same loop, and our three generators; and the prompts they share."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

BF16 = torch.bfloat16

# the generators' prompt text (and the loops' 8- and 64-token prompts, its first tokens)
PROMPT_TEXT = (
    "The lighthouse stood on a rock at the edge of the bay, and for forty years the same family kept its lamp "
    "burning through every storm. Each evening the keeper climbed the spiral stairs, trimmed the wick, polished "
    "the great lens and wrote the weather in a leather ledger: the direction of the wind, the height of the "
    "waves, the ships that passed before dark. In winter the sea froze along the shore and the supply boat "
    "could not reach the island for weeks, so the family learned to bake their own bread, to mend their own "
    "nets and to read by the light of the lamp when the oil for the house ran low. "
)


# ---------------------------------------------------------------------------------------------- inputs

@dataclass
class Inputs:
    vocab: int
    ids8: torch.Tensor       # (1, 8) decode prompt
    ids64: torch.Tensor      # (1, 64) first-token prompt
    text8: str               # the same prompts as text, for generate_simple
    text64: str
    prefill_len: int
    batch: int

    def prefill_ids(self) -> torch.Tensor:
        return torch.randint(0, self.vocab, (1, self.prefill_len), generator=torch.Generator().manual_seed(2))

    def batch_ids(self) -> torch.Tensor:
        return torch.randint(0, self.vocab, (self.batch, 8), generator=torch.Generator().manual_seed(1))


def make_inputs(tokenizer, vocab: int, prefill_len: int, batch: int) -> Inputs:
    text = PROMPT_TEXT
    ids = tokenizer.encode(text)
    while ids.shape[-1] < 64:
        text += PROMPT_TEXT
        ids = tokenizer.encode(text)
    ids8, ids64 = ids[:, :8].clone(), ids[:, :64].clone()
    return Inputs(vocab, ids8, ids64, tokenizer.decode(ids8[0]), tokenizer.decode(ids64[0]), prefill_len, batch)


# ---------------------------------------------------------------------------------------------- engines

class Engine:
    """One row. `decode`, `prefill`, `batch_decode`, `first_token` return a figure, or None when not measured."""
    name = ""
    weight_bytes = 0
    ref = None          # name of the seed-API loop row this row is compared to ("vs loop")

    def activate(self) -> None:
        """Put the shared model into this row's mode (eager or compiled) before measuring."""

    def decode(self, inp: Inputs, n: int) -> float | None: ...
    def prefill(self, inp: Inputs) -> float | None: return None
    def batch_decode(self, inp: Inputs, n: int) -> float | None: return None
    def first_token(self, inp: Inputs) -> float | None: ...


def use_model(model, runner, activations: str = "int16") -> None:
    """Route the model's decode calls through `runner` (None: eager), with the CPU kernels' activation mode
    (ops.set_cpu_activations) the engine's rows are measured at."""
    from exllamav2 import ops
    ops.set_cpu_activations(activations)
    model.decode_runner = runner


class LoopEngine(Engine):
    """Engines driven by the seed-API loop: `start(ids)` -> last logits (b, vocab) after the prompt (resets
    state), `step(ids (b, 1))` -> logits (b, vocab)."""
    batch = True

    def start(self, ids: torch.Tensor) -> torch.Tensor: ...
    def step(self, ids: torch.Tensor) -> torch.Tensor: ...

    def _decode(self, ids: torch.Tensor, n: int) -> float:
        tok = self.start(ids).argmax(-1, keepdim=True)
        t0 = time.perf_counter()
        for _ in range(n):
            tok = self.step(tok).argmax(-1, keepdim=True)
        return ids.shape[0] * n / (time.perf_counter() - t0)

    def decode(self, inp, n):
        return self._decode(inp.ids8, n)

    def batch_decode(self, inp, n):
        return self._decode(inp.batch_ids(), n) if self.batch and inp.batch > 1 else None

    def prefill(self, inp):
        ids = inp.prefill_ids()
        t0 = time.perf_counter()
        self.start(ids).argmax(-1)
        return ids.shape[-1] / (time.perf_counter() - t0)

    def first_token(self, inp):
        t0 = time.perf_counter()
        self.start(inp.ids64).argmax(-1)
        return (time.perf_counter() - t0) * 1000


class SeedLoop(LoopEngine):
    """The seed API: model.forward(prompt, cache, last_id_only=True), then model.forward(tok, cache) per token.
    `runner` None runs eager; a runner from model.compile_decode() runs the compiled step."""

    def __init__(self, name: str, model, runner, caches: dict, weight_bytes: int, activations: str = "int16"):
        self.name, self.model, self.runner, self.caches = name, model, runner, caches
        self.weight_bytes = weight_bytes
        self.activations = activations  # ops.set_cpu_activations mode while this row runs
        self.cache = None

    def activate(self):
        use_model(self.model, self.runner, self.activations)

    def start(self, ids):
        self.cache = self.caches[ids.shape[0]]
        self.cache.current_seq_len = 0
        return self.model.forward(ids, self.cache, last_id_only=True)[:, -1]

    def step(self, ids):
        return self.model.forward(ids, self.cache)[:, -1]


class HFEngine(LoopEngine):
    def __init__(self, gguf_path: str):
        from transformers import AutoModelForCausalLM
        import warnings

        from transformers.utils import logging
        logging.set_verbosity_error()
        # transformers 5.x deprecates `past_key_values=` in favour of `cache=` on some models; the old name still
        # works and is what older versions take
        warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated.*", category=FutureWarning)
        self.model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path),
                                                          dtype=BF16).eval()
        self.name = "HF transformers bf16"
        n = sum(p.numel() for n_, p in self.model.named_parameters() if "embed_tokens" not in n_)
        if self.model.config.tie_word_embeddings:
            n += self.model.get_output_embeddings().weight.numel()
        self.weight_bytes = n * 2
        self.past = None

    @torch.inference_mode()
    def start(self, ids):
        from transformers import DynamicCache
        self.past = DynamicCache()
        out = self.model(ids, past_key_values=self.past, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1].float()

    @torch.inference_mode()
    def step(self, ids):
        return self.model(ids, past_key_values=self.past, use_cache=True).logits[:, -1].float()


class LlamaCppEngine(LoopEngine):
    batch = False

    def __init__(self, gguf_path: str, label: str, threads: int, max_len: int):
        from llama_cpp import Llama
        self.llm = Llama(model_path=gguf_path, n_ctx=max_len, n_batch=512, n_threads=threads,
                         n_threads_batch=threads, verbose=False)
        self.name = f"llama.cpp {label}"
        self.weight_bytes = os.path.getsize(gguf_path)

    def _logits(self):
        import numpy as np
        return torch.from_numpy(np.asarray(self.llm.scores[self.llm.n_tokens - 1])).unsqueeze(0)

    def start(self, ids):
        self.llm.reset()
        self.llm.eval(ids[0].tolist())
        return self._logits()

    def step(self, ids):
        self.llm.eval([int(ids[0, 0])])
        return self._logits()


def requantize_gguf(src: str, dst: str, ftype_name: str) -> str | None:
    """llama.cpp's quantizer (re-quantizing the shipped file); None when it fails."""
    import llama_cpp
    if os.path.exists(dst):
        return dst
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype_name)
    params.allow_requantize = True
    params.nthread = 2
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params)
    return dst if rc == 0 and os.path.exists(dst) else None


class GeneratorEngine(Engine):
    """A generator on a loaded model; decode rate = tokens after the first / time from the first to the last."""

    def __init__(self, name: str, model, runner, ref: str, weight_bytes: int):
        from exllamav2.generator.sampler import ExLlamaV2Sampler
        self.name, self.model, self.runner, self.ref = name, model, runner, ref
        self.weight_bytes = weight_bytes
        self.greedy = ExLlamaV2Sampler.Settings.greedy()

    def activate(self):
        use_model(self.model, self.runner)


class BaseGenEngine(GeneratorEngine):
    """generate_simple is one blocking call: its decode time is t(N + 1 tokens) - t(1 token) on the same prompt
    (the prefill and the first token cancel out)."""

    def __init__(self, name, model, runner, ref, weight_bytes, cache, tokenizer):
        super().__init__(name, model, runner, ref, weight_bytes)
        from exllamav2.generator.base import ExLlamaV2BaseGenerator
        self.gen = ExLlamaV2BaseGenerator(model, cache, tokenizer)

    def _run(self, text: str, n: int) -> float:
        t0 = time.perf_counter()
        self.gen.generate_simple(text, self.greedy, num_tokens=n, stop_token=None)
        return time.perf_counter() - t0

    def decode(self, inp, n):
        one = self._run(inp.text8, 1)
        many = self._run(inp.text8, n + 1)
        return n / max(many - one, 1e-9)

    def first_token(self, inp):
        return self._run(inp.text64, 1) * 1000


class StreamingGenEngine(GeneratorEngine):
    def __init__(self, name, model, runner, ref, weight_bytes, cache, tokenizer):
        super().__init__(name, model, runner, ref, weight_bytes)
        from exllamav2.generator.streaming import ExLlamaV2StreamingGenerator
        self.cache = cache
        self.gen = ExLlamaV2StreamingGenerator(model, cache, tokenizer)
        self.gen.set_stop_conditions([])

    def _run(self, ids: torch.Tensor, n: int) -> tuple[int, float, float]:
        """(tokens, time from begin_stream_ex to the first token, time from the first token to the last)."""
        self.cache.current_seq_len = 0      # the cache is shared with other rows: no prefix reuse
        self.gen.sequence_ids = None
        t0 = time.perf_counter()
        self.gen.begin_stream_ex(ids, self.greedy, max_new_tokens=n)
        count, t_first, t_last = 0, None, None
        while True:
            r = self.gen.stream_ex()
            k = r["chunk_token_ids"].shape[-1]
            if k:
                now = time.perf_counter()
                if t_first is None:
                    t_first, k = now, 0
                count += k
                t_last = now
            if r["eos"]:
                break
        return count, t_first - t0, (t_last - t_first)

    def decode(self, inp, n):
        count, _, dt = self._run(inp.ids8, n + 1)
        return count / max(dt, 1e-9)

    def first_token(self, inp):
        return self._run(inp.ids64, 1)[1] * 1000


class DynamicGenEngine(GeneratorEngine):
    def __init__(self, name, model, runner, ref, weight_bytes, cache, tokenizer, page_size: int):
        super().__init__(name, model, runner, ref, weight_bytes)
        from exllamav2.generator.dynamic import ExLlamaV2DynamicGenerator
        self.gen = ExLlamaV2DynamicGenerator(model, cache, tokenizer, page_size=page_size)

    def _run(self, ids: torch.Tensor, n: int) -> tuple[int, float, float]:
        from exllamav2.generator.dynamic import ExLlamaV2DynamicJob
        self.gen.reset_page_table()          # no prefix reuse between repetitions: every run prefills
        job = ExLlamaV2DynamicJob(ids, n, gen_settings=self.greedy, stop_conditions=[])
        t0 = time.perf_counter()
        self.gen.enqueue(job)
        count, t_first, t_last = 0, None, None
        while self.gen.num_remaining_jobs():
            for r in self.gen.iterate():
                if r["stage"] != "streaming":
                    continue
                k = r["token_ids"].shape[-1]
                if k:
                    now = time.perf_counter()
                    if t_first is None:
                        t_first, k = now, k - 1
                    count += k
                    t_last = now
        return count, t_first - t0, t_last - t_first

    def decode(self, inp, n):
        count, _, dt = self._run(inp.ids8, n + 1)
        return count / max(dt, 1e-9)

    def first_token(self, inp):
        return self._run(inp.ids64, 1)[1] * 1000


class RunnerProbe:
    """Stands in for model.decode_runner: counts the forwards that would take the decode-runner path (and hence
    the compiled step), running them eagerly through an uncompiled runner."""

    def __init__(self, model):
        from exllamav2.runtime.decode import DecodeRunner
        self.inner = DecodeRunner(model, compile=False)
        self.asked = self.applied = 0
        self.paged = None  # the dynamic generator's compiled paged step is not probed here

    def applies(self, *args) -> bool:
        self.asked += 1
        ok = self.inner.applies(*args)
        self.applied += bool(ok)
        return ok

    def __call__(self, ids, cache):
        return self.inner(ids, cache)
