"""ExLlamaV2 in pure Python on PyTorch."""

from .version import __version__
from .config import ExLlamaV2Config
from .model import ExLlamaV2
from .cache import ExLlamaV2Cache, ExLlamaV2CacheBase
from .module import ExLlamaV2Module, Intervention
from .attn import ExLlamaV2Attention
from .mlp import ExLlamaV2MLP
from .linear import ExLlamaV2Linear
from .embedding import ExLlamaV2Embedding
from .rmsnorm import ExLlamaV2RMSNorm
from .layernorm import ExLlamaV2LayerNorm
from .architecture import ExLlamaV2ArchParams, RopeStyle, supported_architectures
from .lora import ExLlamaV2Lora
from .util import SeqTensor, Timer
from .cache import ExLlamaV2Cache_8bit, ExLlamaV2Cache_Q4, ExLlamaV2Cache_Q6, ExLlamaV2Cache_Q8


def __getattr__(name):
    # parts that pull in optional pieces are imported on first use
    if name == "ExLlamaV2Tokenizer":
        from .tokenizer import ExLlamaV2Tokenizer
        return ExLlamaV2Tokenizer
    if name == "ExLlamaV2ParallelDecoder":
        from .parallel_decoder import ExLlamaV2ParallelDecoder
        return ExLlamaV2ParallelDecoder
    raise AttributeError(f"module 'exllamav2' has no attribute {name!r}")
