"""Grammar-constrained decoding through llguidance: filters for JSON Schema, any JSON object, regex, Lark and
EBNF grammars (filter.py), compiled once per grammar and cached (compiler.py, which also says why llguidance)."""

from .compiler import GRAMMAR_KINDS, GrammarCache, GrammarError, default_cache
from .filter import (ExLlamaV2EbnfFilter, ExLlamaV2GrammarFilter, ExLlamaV2JsonObjectFilter, ExLlamaV2JsonSchemaFilter,
                     ExLlamaV2LarkFilter, ExLlamaV2RegexFilter)

__all__ = ["GRAMMAR_KINDS", "GrammarCache", "GrammarError", "default_cache", "ExLlamaV2GrammarFilter",
           "ExLlamaV2JsonSchemaFilter", "ExLlamaV2JsonObjectFilter", "ExLlamaV2RegexFilter", "ExLlamaV2LarkFilter",
           "ExLlamaV2EbnfFilter"]
