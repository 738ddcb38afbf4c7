"""Sampling and generation."""

from .sampler import ExLlamaV2Sampler
from .filters import ExLlamaV2Filter, ExLlamaV2PrefixFilter, ExLlamaV2SelectFilter
from .sampler_hooks import ExLlamaV2PostSamplingHook, ExLlamaV2PostSamplingResult


def __getattr__(name):
    # generators are imported on first use so that `exllamav2.generator.sampler` stays light
    if name == "ExLlamaV2BaseGenerator":
        from .base import ExLlamaV2BaseGenerator
        return ExLlamaV2BaseGenerator
    if name == "ExLlamaV2StreamingGenerator":
        from .streaming import ExLlamaV2StreamingGenerator
        return ExLlamaV2StreamingGenerator
    if name in ("ExLlamaV2DynamicGenerator", "ExLlamaV2DynamicJob"):
        from . import dynamic
        return getattr(dynamic, name)
    if name in ("ExLlamaV2DynamicGeneratorAsync", "ExLlamaV2DynamicJobAsync"):
        from . import dynamic_async
        return getattr(dynamic_async, name)
    if name.startswith("ExLlamaV2") and name.endswith("Filter") or name in ("GrammarError", "GrammarCache"):
        from . import grammar  # llguidance is imported only when a grammar filter is asked for
        if hasattr(grammar, name):
            return getattr(grammar, name)
    raise AttributeError(f"module 'exllamav2.generator' has no attribute {name!r}")
