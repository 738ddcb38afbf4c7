"""ExLlamaV2MLP: norm -> gate/up -> act(gate) * up (or act(up) when ungated) -> down [-> post norm] -> + residual."""

from __future__ import annotations

from . import eager_decode, ops
from .activations import get_activation
from .fused_linear import FusedLinear
from .linear import ExLlamaV2Linear
from .module import ExLlamaV2Module
from .norms import make_norm


class ExLlamaV2MLP(ExLlamaV2Module):
    name = "MLP"
    per_position = True

    def __init__(self, model, key, layer_idx: int, has_norm: bool = True, has_residual: bool = True,
                 archparams=None, in_features=None, out_features=None, interm_features=None, merge=None,
                 pad32: bool = True):
        super().__init__(model, key, archparams)
        cfg, ap = self.config, self.archparams
        keys = ap.keys
        self.layer_idx = layer_idx
        self.has_norm = has_norm
        self.has_residual = has_residual
        self.in_features = in_features or cfg.hidden_size
        self.out_features = out_features or cfg.hidden_size
        self.interm_features = interm_features or cfg.intermediate_size
        # config.json's activation wins over the family default (it is what HF runs)
        act = cfg.hidden_act if isinstance(cfg.hidden_act, str) else ap.mlp_act_func
        self.act = get_activation(act)
        self.act_name = act
        self.gated = ap.mlp_gate
        inf, outf, im, bias = self.in_features, self.out_features, self.interm_features, ap.mlp_bias

        self.pre_layernorm = make_norm(model, key + keys["norm_2"], ap) if (has_norm and keys["norm_2"]) else None
        self.post_layernorm = make_norm(model, key + keys["norm_2_post"], ap) if keys["norm_2_post"] else None
        if self.gated and keys["fused_mlp_12"]:
            fk = key + keys["fused_mlp_12"]
            self.gate_proj = ExLlamaV2Linear(model, key + keys["mlp_gate"], inf, im, bias, f_key=fk, f_beg=0, f_end=im,
                                             archparams=ap, fused_rows=2 * im)
            self.up_proj = ExLlamaV2Linear(model, key + keys["mlp_up"], inf, im, bias, f_key=fk, f_beg=im, f_end=2 * im,
                                           archparams=ap, fused_rows=2 * im)
        else:
            self.gate_proj = ExLlamaV2Linear(model, key + keys["mlp_gate"], inf, im, bias, archparams=ap) if self.gated else None
            self.up_proj = ExLlamaV2Linear(model, key + keys["mlp_up"], inf, im, bias, archparams=ap)
        self.down_proj = ExLlamaV2Linear(model, key + keys["mlp_down"], im, outf, bias, archparams=ap,
                                         prescale=cfg.scale_depth)
        self.submodules = [m for m in (self.pre_layernorm, self.gate_proj, self.up_proj, self.down_proj,
                                       self.post_layernorm) if m is not None]
        # gate and up run as one matmul (fused_linear.py)
        self.gate_up = FusedLinear([self.gate_proj, self.up_proj], self, ("gate_proj", "up_proj")) if self.gated else None

    def load(self, device_context: bool = True):
        super().load(device_context)
        if self.gate_up is not None:
            self.gate_up.prepare(self.dtype)

    def hook_sites(self) -> dict:
        """Where the intervention points of this branch are (see interventions/points.py)."""
        return {
            "mlp.post_norm": ("pre_layernorm", "post", self.in_features) if self.pre_layernorm is not None
            else ("", "pre", self.in_features),
            "mlp.pre_down": ("down_proj", "pre", self.interm_features),
            "mlp_out": ("post_layernorm" if self.post_layernorm is not None else "down_proj", "post",
                        self.out_features),
        }

    def is_quant(self) -> bool:
        return self.up_proj.is_quant()

    def update_loras(self):
        pass

    def rank_reduce(self, k: float):
        for m in (self.gate_proj, self.up_proj, self.down_proj):
            if m is not None:
                m.rank_reduce(k)

    def scratch_space_fixed(self) -> int:
        rows = self.config.max_input_len * self.config.max_batch_size
        return rows * (2 * self.interm_features + self.out_features) * 2

    def scratch_space(self) -> int:
        return self.scratch_space_fixed()

    def forward(self, hidden_states, cache=None, attn_params=None, past_len=None, intermediates=False,
                loras=None, **kwargs):
        if not intermediates:
            out = eager_decode.mlp(self, hidden_states, loras, kwargs)
            if out is not None:
                return out
        residual = hidden_states
        x = self.pre_layernorm.forward(hidden_states) if self.pre_layernorm is not None else hidden_states
        post_norm = x
        pre_down = self.activate(x, loras)
        y = self.down_proj.forward(pre_down, loras=loras)
        if self.post_layernorm is not None:
            y = self.post_layernorm.forward(y)
        out = self.add_residual(residual, y)
        if intermediates:
            return {"post_norm": post_norm, "pre_down": pre_down, "hidden_states": out}
        return out

    def activate(self, x, loras=None):
        if self.gate_proj is None:
            return ops.activation(self.up_proj.forward(x, loras=loras), self.act_name)
        y = self.gate_up.forward_plain(x, loras)
        gate, up = y.split(self.gate_up.sizes, dim=-1) if y is not None else self.gate_up.forward(x, loras)
        return ops.gated_activation(gate, up, self.act_name)
