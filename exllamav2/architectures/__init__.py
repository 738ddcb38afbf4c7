"""Architecture families. Each module registers its ArchParams on import; a new family is a new module here."""

from . import (  # noqa: F401
    cohere, gemma, gpt2, gpt_neox, gptj, granite, internlm2, llama, mixtral, olmo2, phi, qwen_moe, stablelm,
    starcoder2,
)
