"""OLMo 2: post-norms only (after attention and after the MLP), RMS q/k norm over the whole projection before
the reshape into heads."""

from ..architecture import ArchParams, default_keys, register

OLMO2 = ArchParams(
    family="olmo2",
    use_qk_norm=True,
    qk_norm_before_reshape=True,
    keys={**default_keys(), "norm_1": None, "norm_1_post": ".post_attention_layernorm",
          "norm_2": None, "norm_2_post": ".post_feedforward_layernorm"},
)

register("Olmo2ForCausalLM", OLMO2, notes="post-norms only, q/k RMS norm over the whole projection")
