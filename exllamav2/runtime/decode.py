"""The decode runner: `model.forward(ids, cache)` for one new token per row, run by the model's own modules
with nothing on the host inside the step (no `.item()`, no per-step tensors built from Python lists), and
optionally compiled once with torch.compile.

Every decode call made through `model.forward` (the seed API, every generator, the server) comes here when the
runner is enabled (`model.compile_decode()`) and the call is a plain decode step:
- one token per row, a plain `ExLlamaV2Cache` (or a quantized one, cache_q.py, through the compiled paged step:
  `_quantized`), no padding mask or position offsets;
- no LoRA, no intervention anywhere in the model (interventions run the same modules eagerly: an edit never
  leaves the fast kernels, only the compiled graph), no extra outputs requested.
Anything else runs the same modules eagerly. On CUDA the step runs as the paged step's CUDA graphs, one per
bucket of batch sizes (runtime/cuda_graphs.py); on the CPU it is compiled.

Compiling: the step is traced through the module forwards with the sequence length dynamic, compiled for one
row and for the cache's batch size, with inductor's cache on disk (runtime/compile.py) so later processes load it.
"""

from __future__ import annotations

import time

import torch

from ..attn_params import Params
from ..cache_q import has_quant_pages
from ..module import interventions_alive
from .compile import INDUCTOR_OPTIONS, Ticker, bind_model, call_tracing, configure_inductor
from .guards import TrustedSteps, cache_kind


def decode_step(model, ids: torch.Tensor, cache, past: int) -> torch.Tensor:
    """The module forwards for ids (b, 1) at position `past`: fp32 logits (b, 1, vocab). The cache's length is
    not advanced here (the caller does it, outside any compiled region)."""
    params = Params(ids.shape[0], 1, past)
    x = ids
    for module in model.modules:
        x = module.forward(x, cache=cache, attn_params=params, past_len=past)
    return model.final_logits(x)


class DecodeRunner:
    def __init__(self, model, compile: bool = True, progress: bool = True, options: dict | None = None,
                 batch_sizes=(1,), max_seq_len: int | None = None, freeze: bool = False, paged: bool | None = None,
                 check_guards: bool = False):
        self.model = model
        self.trusted = TrustedSteps(check_guards)  # dynamo's guards checked once per kind of call (runtime/guards.py)
        self.compiled = compile
        self.compile_seconds = 0.0
        self.graph_breaks = False  # True when the step compiled as several graphs (a host sync inside it)
        self._ids: dict = {}    # per batch size, the step's input buffer (inference tensors, as the warm-up's)
        self._steps: dict = {}  # per batch size, the compiled step
        self._options: dict = {}
        self._max_seq_len = max_seq_len
        self.progress = progress
        self.paged = None
        self.graphs = None  # on a GPU: the paged decode step captured as CUDA graphs (runtime/cuda_graphs.py)
        devices = [str(d) for d in model.get_cache_devices()]
        if compile and len(devices) == 1 and devices[0].startswith("cuda"):
            from .cuda_graphs import GraphedDecode
            from .paged_decode import PagedDecode
            self.compiled = False
            self.graphs = GraphedDecode(model, progress)
            self.paged = PagedDecode(self)
        elif compile:
            configure_inductor(freeze)
            self._options = {**INDUCTOR_OPTIONS, **(options or {})}
            t0 = time.time()
            with Ticker("Compiling the decode step (cached on disk after the first time)", progress):
                for b in sorted(set(batch_sizes)):
                    self._steps[b] = self._compile(b)
            self.compile_seconds = time.time() - t0
            if paged is None or paged:
                from .paged_decode import PagedDecode
                self.paged = PagedDecode(self)  # the dynamic generator's decode steps, compiled at their first use

    def _needs_aten(self, e: Exception) -> bool:
        # inductor wraps NoValidChoicesError in its own error types
        return "NoValidChoicesError" in repr(e) and "ATEN" not in self._options["max_autotune_gemm_backends"]

    def _compile(self, b: int):
        try:
            return self._compile_one(b)
        except Exception as e:
            if self._needs_aten(e):
                # the C++ GEMM template has no micro-kernel for some matmul here (the int4 kernel's, say): offer
                # ATen's kernels beside it
                self._options = {**self._options, "max_autotune_gemm_backends": "CPP,ATEN"}
            elif self.graph_breaks or "NoValidChoicesError" in repr(e):
                raise
            else:
                # some module syncs with the host inside the step (MoE routing counts tokens per expert on the
                # host): compile the pieces between those points instead of one graph
                self.graph_breaks = True
            return self._compile(b)

    def _compile_one(self, b: int):
        """The step compiled for caches of `b` rows. Each batch size gets its own copy of the step's code, so
        dynamo keeps one graph per size with the batch static (one shared code object turns the batch dimension
        symbolic at the second size and runs every size through that slower graph)."""
        from ..cache import ExLlamaV2Cache
        step = self.compile_fn(bind_model(decode_step, self.model, f"decode_step_b{b}"))
        # the cache length is part of the compiled shapes: warm up with the one generators allocate
        cache = ExLlamaV2Cache(self.model, batch_size=b,
                               max_seq_len=self._max_seq_len or self.model.config.max_seq_len)
        with torch.inference_mode():
            # an inference tensor, as the runner's own input buffer is: a plain one would fail dynamo's
            # dispatch-key guard at the first real step and compile the step again there
            ids = torch.zeros(b, 1, dtype=torch.long)
            # shapes are static but for the position: the second call marks it dynamic (dynamic=True would make
            # every weight's shape symbolic, and tracing then spends minutes in sympy)
            for p in (1, 2):
                call_tracing(step, ids, cache, p)
        return step

    def compile_fn(self, fn):
        return torch.compile(fn, options=self._options, dynamic=None, fullgraph=not self.graph_breaks)

    def applies_to_model(self) -> bool:
        """False while an intervention wraps a module of this model (those run eagerly)."""
        if not interventions_alive():
            return True
        from ..interventions.hooks import wrapped_slots
        return not wrapped_slots(self.model)

    def applies(self, input_ids, cache, input_mask, position_offsets, loras, preprocess_only, return_last_state,
                abort_event, kwargs) -> bool:
        from ..cache import ExLlamaV2Cache
        from ..cache_q import ExLlamaV2CacheQuantBase
        quant = isinstance(cache, ExLlamaV2CacheQuantBase)
        if (input_ids.shape[-1] != 1 or (type(cache) is not ExLlamaV2Cache and not quant) or input_mask is not None
                or position_offsets is not None or loras or preprocess_only or return_last_state
                or abort_event is not None or kwargs):
            return False
        if cache.key_states[0] is None:
            return False
        if cache.key_states[0].device.type != "cpu":
            if self.graphs is None or self.paged.failed or not cache.key_states[0].is_contiguous():
                return False
        elif self.graphs is not None:
            return False
        elif quant and (self.paged is None or self.paged.failed or not self.paged.usable(self.model, cache, loras)):
            return False  # a quantized cache on the CPU decodes through the compiled paged step (_quantized)
        return self.applies_to_model()

    def __call__(self, input_ids: torch.Tensor, cache) -> torch.Tensor:
        if self.graphs is not None:
            return self._graphed(input_ids, cache)
        if has_quant_pages(cache):
            return self._quantized(input_ids, cache)
        b = input_ids.shape[0]
        buf = self._ids.get(b)
        if buf is None:
            with torch.inference_mode():
                buf = self._ids[b] = torch.zeros(b, 1, dtype=torch.long)
        buf.copy_(input_ids)
        past = cache.current_seq_len
        if self.compiled:
            step = self._steps.get(b)
            if step is None:  # a batch size not compiled ahead: compile it now, once
                step = self._steps[b] = self._compile(b)
            # positions 0 and 1 get graphs of their own (dynamo specialises them), the rest share one
            kind = (b, min(past, 2), cache_kind(cache))
            try:
                logits = self.trusted.call(step, kind, buf, cache, past)
            except Exception as e:
                if not self._needs_aten(e):
                    raise
                # a recompile (another backend pinned since, say) met a matmul the C++ GEMM template cannot do
                self._options = {**self._options, "max_autotune_gemm_backends": "CPP,ATEN"}
                self.trusted.forget()
                step = self._steps[b] = self._compile(b)
                logits = self.trusted.call(step, kind, buf, cache, past)
        else:
            logits = decode_step(self.model, buf, cache, past)
        cache.current_seq_len = past + 1
        return logits


    def _quantized(self, input_ids: torch.Tensor, cache) -> torch.Tensor:
        """Decode over a quantized cache (cache_q.py) on the CPU: the dynamic generator's compiled paged step over the
        cache's rows seen as consecutive pages (runtime/cuda_graphs.py: FlatQuantCache), which reads the codes inside
        attention, where the eager step dequantises every layer's whole prefix into a temporary per token."""
        from ..paged_attn import PagedParams
        from .cuda_graphs import contiguous_table, flat_view
        past, b = cache.current_seq_len, input_ids.shape[0]
        table, page = contiguous_table(cache, "cpu", b)
        paged = cache if cache.batch_size == 1 else flat_view(cache)
        params = PagedParams(table.tolist(), [past] * b, [1] * b, page)
        logits = self.paged(input_ids.reshape(1, b), paged, params)
        if logits is None:  # the step failed to compile (one line said why): the eager step, as it was
            logits = decode_step(self.model, input_ids, cache, past)
        else:
            logits = logits.view(b, 1, -1)
        cache.current_seq_len = past + 1
        return logits

    def _graphed(self, input_ids: torch.Tensor, cache) -> torch.Tensor:
        """Decode on a GPU: the captured paged step over the plain cache's rows seen as consecutive pages of one
        paged cache (runtime/cuda_graphs.py)."""
        from .cuda_graphs import contiguous_table, flat_view
        dev = cache.key_states[0].device
        past, b = cache.current_seq_len, input_ids.shape[0]
        table, page = contiguous_table(cache, dev, b)
        paged = cache if cache.batch_size == 1 else flat_view(cache)
        logits = self.paged.graphed(paged, input_ids.to(dev).view(1, b), table,
                                    torch.full((b,), past, dtype=torch.long, device=dev), page)
        if logits is None:  # the capture failed: the eager step, as it was
            logits = decode_step(self.model, input_ids, cache, past)
        else:
            logits = logits.view(b, 1, -1)
        cache.current_seq_len = past + 1
        return logits
