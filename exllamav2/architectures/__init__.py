"""Architecture families. Each module registers its ArchParams on import; add new families to this list."""

from . import llama  # noqa: F401

FAMILY_MODULES = ["llama"]

for _name in ("gemma", "gpt_neox", "gptj", "phi", "cohere", "gpt2", "mixtral", "qwen_moe", "starcoder2",
              "granite", "stablelm", "olmo2", "internlm2"):
    try:
        __import__(f"{__name__}.{_name}")
        FAMILY_MODULES.append(_name)
    except ModuleNotFoundError as e:  # family file not present in this build
        if e.name != f"{__name__}.{_name}":
            raise
