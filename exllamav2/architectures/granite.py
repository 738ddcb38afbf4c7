"""Granite: Llama with embedding, residual (o_proj/down prescale), attention and logit multipliers, all read by
the config (embedding_multiplier, residual_multiplier, attention_multiplier, logits_scaling)."""

from ..architecture import ArchParams, register

register("GraniteForCausalLM", ArchParams(family="granite"),
         notes="Llama + embedding/residual/attention multipliers and logits_scaling")
