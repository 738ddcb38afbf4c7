"""ExLlamaV2ParallelDecoder (seed 002): one decoder layer whose attention and MLP branches both read the normed
input and both add to the residual: h + attn(norm(h)) + mlp(norm(h)).

The shared `input_layernorm` is at `keys["norm_1"]`. When `keys["norm_2"]` is set, the MLP branch reads its own
norm of the same input instead (GPT-NeoX's parallel residual: mlp(post_attention_layernorm(h))).
"""

from __future__ import annotations

from .attn import ExLlamaV2Attention
from .mlp import ExLlamaV2MLP
from .module import ExLlamaV2Module
from .norms import make_norm


class ExLlamaV2ParallelDecoder(ExLlamaV2Module):
    name = "ParallelDecoder"
    kv_layer = True  # the attention branch owns a layer of the KV cache

    def __init__(self, model, key: str, layer_idx: int, sliding_window: int = 0, archparams=None,
                 rope_index: int = 0):
        super().__init__(model, key, archparams)
        ap = self.archparams
        keys = ap.keys
        self.layer_idx = layer_idx
        self.sliding_window = sliding_window
        self.input_layernorm = make_norm(model, self.key + keys["norm_1"], ap) if keys["norm_1"] else None
        self.mlp_layernorm = make_norm(model, self.key + keys["norm_2"], ap) if keys["norm_2"] else None
        self.attn = ExLlamaV2Attention(model, self.key, layer_idx, has_norm=False, has_residual=False,
                                       sliding_window=sliding_window, archparams=ap, rope_index=rope_index)
        self.mlp = ExLlamaV2MLP(model, self.key, layer_idx, has_norm=False, has_residual=False, archparams=ap)
        norms = [m for m in (self.input_layernorm, self.mlp_layernorm) if m is not None]
        # the norms and every linear, so that model.modules_dict sees them by key
        self.submodules = norms + self.attn.submodules + self.mlp.submodules
        self._children = norms + [self.attn, self.mlp]

    # ------------------------------------------------------------------ module interface

    def load(self, device_context: bool = True):
        for m in self._children:
            m.load()

    def unload(self):
        for m in self._children:
            m.unload()

    def numel(self) -> int:
        return sum(m.numel() for m in self._children)

    def is_quant(self) -> bool:
        return self.attn.is_quant() or self.mlp.is_quant()

    def update_loras(self):
        self.attn.update_loras()
        self.mlp.update_loras()

    def rank_reduce(self, k: float):
        for m in (self.attn.q_proj, self.attn.k_proj, self.attn.v_proj, self.attn.o_proj):
            m.rank_reduce(k)
        self.mlp.rank_reduce(k)

    def set_device_idx(self, idx: int | None):
        self.device_idx = -1 if idx is None else idx
        for m in self._children:
            m.set_device_idx(idx)

    def scratch_space_fixed(self) -> int:
        return self.attn.scratch_space_fixed() + self.mlp.scratch_space_fixed()

    def scratch_space(self) -> int:
        return self.attn.scratch_space() + self.mlp.scratch_space()

    def scratch_space_tp(self) -> int:
        return self.attn.scratch_space_tp() + self.mlp.scratch_space_tp()

    # ------------------------------------------------------------------ forward

    def forward(self, hidden_states, cache=None, attn_params=None, past_len=None, intermediates=False,
                loras=None, **kwargs):
        r = self.forward_interm(hidden_states, cache, attn_params, past_len, intermediates, loras, **kwargs)
        return r if intermediates else r["hidden_states"]

    def forward_interm(self, hidden_states, cache=None, attn_params=None, past_len=None, intermediates=False,
                       loras=None, **kwargs) -> dict:
        """Both branches and their sum: post_norm (the shared norm's output), attn_output (input of o_proj),
        pre_down (input of the MLP's down projection), hidden_states_attn and hidden_states_mlp (each branch's
        output), hidden_states (input + attention branch + MLP branch)."""
        residual = hidden_states
        post_norm = self.input_layernorm.forward(hidden_states) if self.input_layernorm is not None else hidden_states
        mlp_in = self.mlp_layernorm.forward(hidden_states) if self.mlp_layernorm is not None else post_norm
        a = self.attn.forward(post_norm, cache, attn_params, past_len, intermediates=True, loras=loras, **kwargs)
        m = self.mlp.forward(mlp_in, cache, attn_params, past_len, intermediates=True, loras=loras, **kwargs)
        h_attn, h_mlp = a["hidden_states"], m["hidden_states"]
        if self.archparams.residual_stream_fp32:
            out = residual.float() + h_attn.float() + h_mlp.float()
        else:
            out = residual + h_attn.to(residual.dtype) + h_mlp.to(residual.dtype)
        return {"post_norm": post_norm, "attn_output": a["attn_output"], "pre_down": m["pre_down"],
                "hidden_states_attn": h_attn, "hidden_states_mlp": h_mlp, "hidden_states": out}
