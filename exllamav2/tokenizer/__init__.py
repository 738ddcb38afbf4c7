from .chat_template import ChatTemplateError
from .gguf_tokenizer import GGUFTokenizerInfo, save_hf_tokenizer_files, tokenizer_from_gguf
from .stream import ExLlamaV2TokenizerStream
from .tokenizer import ExLlamaV2Tokenizer

__all__ = [
    "ExLlamaV2Tokenizer",
    "ExLlamaV2TokenizerStream",
    "GGUFTokenizerInfo",
    "ChatTemplateError",
    "tokenizer_from_gguf",
    "save_hf_tokenizer_files",
]
