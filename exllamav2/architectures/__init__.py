"""Architecture families, one module per family. Each module registers its ArchParams (and, where llama.cpp
writes the family as GGUF, its GGUFArch) on import. The registry (`exllamav2.architecture`) imports every
module in this package itself, so a new family is a new module here and nothing else.

Modules that are not families: names starting with "_", and those in HELPER_MODULES.
"""

HELPER_MODULES = frozenset({"table"})  # table.py: the `info --architectures` table, registers nothing
