"""The fast CPU decode path: `FastDecoder(model, cache, weights=..., compile=...)` beside the reference modules."""

from .compile import set_inductor_cache_dir
from .decoder import FastDecoder, FastPathUnsupported
from .support import unsupported_reason
from .threads import configure_threads

__all__ = ["FastDecoder", "FastPathUnsupported", "configure_threads", "set_inductor_cache_dir", "unsupported_reason"]
