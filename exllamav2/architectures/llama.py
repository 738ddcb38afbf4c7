"""Llama family: Llama 1/2/3, Mistral, Qwen2, Qwen3 and key-name-only variants."""

from ..architecture import ArchParams, register

LLAMA = ArchParams(family="llama", supports_tp=True)

register("LlamaForCausalLM", LLAMA, notes="Llama 1/2/3 (llama3, linear, dynamic, yarn, longrope RoPE scaling)")

# Mistral honours config.sliding_window on every layer (the original ignored it)
register("MistralForCausalLM", ArchParams(family="llama", swa=True), notes="sliding window honoured")

register("Qwen2ForCausalLM", ArchParams(family="llama", attention_bias_qkv=True, swa=False),
         notes="q/k/v bias; sliding window only when use_sliding_window is set",
         configure=lambda p, cfg: setattr(p, "swa", bool(cfg.get("use_sliding_window", False))))

register("Qwen3ForCausalLM", ArchParams(family="llama", use_qk_norm=True, headnorm="rmsnorm"),
         notes="RMS q/k norm per head", configure=lambda p, cfg: setattr(p, "swa", bool(cfg.get("use_sliding_window", False))))

# Yi checkpoints in the original format rename the norms
register("YiForCausalLM", ArchParams(family="llama", keys={**LLAMA.keys, "norm_1": ".ln1", "norm_2": ".ln2"}),
         notes="Llama with ln1/ln2 norm names")
