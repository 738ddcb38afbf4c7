"""ExLlamaV2MoEMLP: norm -> router -> top-k experts (gated MLPs) weighted and summed [+ gated shared expert]
[-> post norm] -> + residual.

Tokens are grouped by expert with one sort; the Python loop runs over the experts that received tokens, never
over tokens (`forward_grouped`). That grouping counts tokens per expert on the host. While torch.compile traces a
CPU step, the grouped path runs as one custom op (moe_grouped_op.py), which dynamo does not look into: the graph
stays whole and each step still runs only the experts its tokens picked. On the `triton` backend (a CUDA device)
the routing is grouped on the device instead and two kernels find each block of tokens' expert through a table of
the experts' addresses (exllamav2/ops/triton/moe.py): no host sync and only the picked experts read, for decode
steps (up to DENSE_ROWS tokens) and always inside a captured graph. A step that must not sync with the host whose
experts those kernels cannot read (a CUDA graph being captured, or a GPU step being compiled) takes the static
path: every expert runs over every token and each token's result is weighted by its router weight for that expert,
0 where it did not pick it (`forward_static`). Shapes there depend on the token count only; the sum runs over the
experts in the same order, so each token gets what the grouped path gives it (adding an exact 0 changes nothing).

Expert weights are read from per-expert tensors (keys `moe_w1`/`moe_w3`/`moe_w2` (gate/up/down) with `*` for the
expert index, the layout HF saves) or from fused 3-D tensors (`experts.gate_up_proj` (E, 2I, H),
`experts.down_proj` (E, H, I), the layout HF 5.x models hold in memory).

Two identity steps (`ExLlamaV2HookPoint`) give the branch module boundaries that no single linear has, so an
`Intervention` can read or edit them (see `hook_sites()` and exllamav2/interventions/points.py):
`pre_down_point` carries every token's selected experts' activations, (b, s, top_k * moe_intermediate_size) in
routing-rank order (slot j = the expert with the j-th largest router weight), right before the experts' down
projections read them; `out_point` carries what the branch adds to the residual (weighted expert sum [+ gated
shared expert] [-> post norm]).
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
import torch.nn as nn

from .activations import get_activation
from .linear import ExLlamaV2Linear
from .mlp import ExLlamaV2MLP
from .module import ExLlamaV2Module, TensorShapeError
from .moe_grouped_op import moe_grouped_experts, register
from .norms import make_norm
from .ops import dispatch
from .ops.triton import declines_device as triton_declines
from .ops.triton import linear as triton_linear
from .ops.triton.moe import expert_tables
from .ops.triton.moe import grouped_experts as grouped_device
from .runtime.graph_step import in_graph_step


class _TablesCache(NamedTuple):
    """What ExLlamaV2MoEMLP._device_tables built, and what it was built from."""
    key: tuple              # (dtype, dispatch generation, ExLlamaV2Linear.kernel_epoch)
    tables: tuple | None    # ops/triton/moe.py ExpertTables for w1, w3, w2; None: declined
    experts: tuple          # copies of the w1, w3, w2 lists
    kernels: list           # the experts' kernels, in w1 + w3 + w2 order


class ExLlamaV2HookPoint(ExLlamaV2Module):
    """An identity step inside a module's forward: a module boundary where an `Intervention` can read or edit a
    tensor that is no other module's input or output. It holds no weights and is not in any `submodules`."""

    name = "HookPoint"

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states

    def numel(self) -> int:
        return 0

    def load(self, *args, **kwargs):
        pass

    def unload(self):
        pass


class ExLlamaV2MoEMLP(ExLlamaV2Module):
    name = "MoEMLP"
    per_position = True

    # None: the static (sync-free) routing path while a CUDA graph is captured or torch.compile traces a GPU step,
    # the grouped path otherwise (as one opaque op while torch.compile traces); True / False: always / never (per
    # module or on the class)
    static_routing: bool | None = None

    def __init__(self, model, key, layer_idx: int, archparams=None):
        super().__init__(model, key, archparams)
        cfg, ap = self.config, self.archparams
        keys = ap.keys
        self.layer_idx = layer_idx
        self.hidden_size = hidden = cfg.hidden_size
        self.num_experts = cfg.num_experts
        self.top_k = cfg.num_experts_per_token
        if not self.num_experts or not self.top_k or self.top_k > self.num_experts:
            raise ValueError(f"{cfg.config_source}: MoE model needs num_experts >= num_experts_per_tok > 0, got "
                             f"{self.num_experts} and {self.top_k}")
        read = cfg.read_config
        self.interm_features = im = cfg._get(read, "moe_intermediate_size", kind=int) or cfg.intermediate_size
        act = cfg.hidden_act if isinstance(cfg.hidden_act, str) else ap.mlp_act_func
        self.act = get_activation(act)

        self.pre_layernorm = make_norm(model, key + keys["norm_2"], ap) if keys["norm_2"] else None
        self.post_layernorm = make_norm(model, key + keys["norm_2_post"], ap) if keys["norm_2_post"] else None
        self.gate = ExLlamaV2Linear(model, key + keys["mlp_expert_gate"], hidden, self.num_experts, False,
                                    pad32=False, archparams=ap)

        def expert(name, e, inf, outf):
            return ExLlamaV2Linear(model, key + keys[name].replace("*", str(e)), inf, outf, False, archparams=ap)

        E = range(self.num_experts)
        self.w1 = [expert("moe_w1", e, hidden, im) for e in E]
        self.w3 = [expert("moe_w3", e, hidden, im) for e in E]
        self.w2 = [expert("moe_w2", e, im, hidden) for e in E]
        self.fused_experts_key = key + keys["moe_fused_experts"] if keys.get("moe_fused_experts") else None

        # Qwen2-MoE: a dense shared expert added to every token, scaled by sigmoid(shared_expert_gate(x))
        self.shared_expert = self.shared_gate = None
        if keys.get("moe_shared_expert"):
            se = keys["moe_shared_expert"]
            sap = ap.clone()
            sap.keys = {**keys, "norm_2": None, "norm_2_post": None, "mlp_gate": ".gate_proj",
                        "mlp_up": ".up_proj", "mlp_down": ".down_proj", "fused_mlp_12": None}
            sap.mlp_gate, sap.mlp_bias = True, False
            size = cfg._get(read, "shared_expert_intermediate_size", kind=int) or im
            self.shared_expert = ExLlamaV2MLP(model, key + se, layer_idx, has_norm=False, has_residual=False,
                                              archparams=sap, interm_features=size)
            if keys.get("moe_shared_expert_gate"):
                self.shared_gate = ExLlamaV2Linear(model, key + keys["moe_shared_expert_gate"], hidden, 1, False,
                                                   pad32=False, archparams=ap)

        self.experts = self.w1 + self.w3 + self.w2
        # identity steps: the tensor the down projections read, and the branch output (see the module docstring)
        self.pre_down_point = ExLlamaV2HookPoint(model, key + ".hook_pre_down", ap)
        self.out_point = ExLlamaV2HookPoint(model, key + ".hook_out", ap)
        self.handle = register(self)  # the grouped path's custom op finds this module by it
        self._tables: _TablesCache | None = None  # see _device_tables
        self.device_path_declined: str | None = None  # why the device-routed kernels last declined this layer
        self.submodules = [m for m in (self.pre_layernorm, self.gate, *self.experts, self.shared_expert,
                                       self.shared_gate, self.post_layernorm) if m is not None]

    # ------------------------------------------------------------------ loading

    def load(self, device_context: bool = True):
        fused = self._load_fused_experts()
        for m in self.submodules:
            if fused is not None and m in fused:
                m.load(w=fused[m])
            else:
                m.load()

    def _load_fused_experts(self) -> dict | None:
        """{expert linear: weight} from fused 3-D expert tensors, or None when the per-expert tensors exist."""
        if self.fused_experts_key is None or self.has_tensor(self.w1[0].key + ".weight") \
                or self.has_tensor(self.w1[0].key + ".q_weight") or self.has_tensor(self.w1[0].key + ".qweight"):
            return None
        gu_name, d_name = self.fused_experts_key + ".gate_up_proj", self.fused_experts_key + ".down_proj"
        if not (self.has_tensor(gu_name) and self.has_tensor(d_name)):
            return None
        E, H, I = self.num_experts, self.hidden_size, self.interm_features
        gu = self._source(gu_name).get_tensor(gu_name)
        down = self._source(d_name).get_tensor(d_name)
        # some exports store the fused tensors as (E, in, out); accept both orientations
        if tuple(gu.shape) == (E, H, 2 * I) and H != 2 * I:
            gu = gu.transpose(1, 2)
        if tuple(down.shape) == (E, I, H) and H != I:
            down = down.transpose(1, 2)
        if tuple(gu.shape) != (E, 2 * I, H):
            raise TensorShapeError(f"{gu_name}: shape {list(gu.shape)}, expected {[E, 2 * I, H]}")
        if tuple(down.shape) != (E, H, I):
            raise TensorShapeError(f"{d_name}: shape {list(down.shape)}, expected {[E, H, I]}")
        dev = self.device()

        def param(t):
            return nn.Parameter(self._float(t.contiguous()).to(dev), requires_grad=False)

        out = {}
        for e in range(E):
            out[self.w1[e]] = param(gu[e, :I])
            out[self.w3[e]] = param(gu[e, I:])
            out[self.w2[e]] = param(down[e])
        return out

    def is_quant(self) -> bool:
        return self.w1[0].is_quant()

    def update_loras(self):
        pass  # LoRA on experts is not supported (as in the original)

    def rank_reduce(self, k: float):
        for m in self.experts:
            m.rank_reduce(k)

    def scratch_space_fixed(self) -> int:
        rows = self.config.max_input_len * self.config.max_batch_size
        return rows * (self.hidden_size * 2 + self.num_experts + 2 * self.interm_features * self.top_k) * 2

    def scratch_space(self) -> int:
        return self.scratch_space_fixed()

    # ------------------------------------------------------------------ forward

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (T, hidden) -> (weights (T, k) fp32, expert ids (T, k)): softmax over the router logits in fp32,
        top-k, optionally renormalised to sum to 1."""
        logits = self.gate.forward(x)
        probs = torch.softmax(logits.float(), dim=-1)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.archparams.moe_norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, ids

    def hook_sites(self) -> dict:
        """Where this branch's intervention points are (exllamav2/interventions/points.py): point suffix ->
        (attribute path from this module, "pre" | "post", width); the path "" is this module itself."""
        H = self.hidden_size
        return {
            "mlp.post_norm": ("pre_layernorm", "post", H) if self.pre_layernorm is not None else ("", "pre", H),
            "mlp.pre_down": ("pre_down_point", "pre", self.top_k * self.interm_features),
            "mlp_out": ("out_point", "post", H),
        }

    def forward(self, hidden_states, cache=None, attn_params=None, past_len=None, intermediates=False,
                loras=None, **kwargs):
        residual = hidden_states
        x = self.pre_layernorm.forward(hidden_states) if self.pre_layernorm is not None else hidden_states
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        weights, ids = self.route(xf)
        inter = {"post_norm": x} if intermediates else None
        tables = self._device_tables(xf) if inter is None else None
        if tables is not None:
            y = grouped_device(xf, weights, ids, tables, self.act, pre_down=lambda a: self.pre_down_point.forward(
                a.view(*shape[:-1], a.shape[-1])))
        elif inter is None and self._routes_statically(xf):
            y = self.forward_static(xf, weights, ids, shape)
        elif inter is None and torch.compiler.is_compiling():
            # the host read of the counts would break the graph: the same path, opaque to dynamo
            y = moe_grouped_experts(x, weights, ids, self.handle)
        else:
            y = self.forward_grouped(x, weights, ids, inter)
        return self._finish(y, xf, shape, residual, inter)

    def forward_grouped(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                        inter: dict | None = None) -> torch.Tensor:
        """The experts' weighted sum (T, hidden) for x (..., hidden), each expert run once over the tokens that
        picked it; `inter` (when given) gets `pre_down` and each expert's `pre_down.{e}` rows."""
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        # group the (token, slot) assignments by expert with one stable sort; assignment t * k + j is token t's
        # j-th ranked expert
        k, im = self.top_k, self.interm_features
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        tokens = order // k
        slot_weights = weights.reshape(-1)[order]

        # gate/up per expert, each activation row written at its assignment's place
        act = None
        beg = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            xe = xf.index_select(0, tokens[beg:beg + n])
            a = self.act(self.w1[e].forward(xe)) * self.w3[e].forward(xe)
            if act is None:
                act = a.new_empty(flat.shape[0], im)
            act.index_copy_(0, order[beg:beg + n], a)
            beg += n
        if act is None:
            act = xf.new_zeros(flat.shape[0], im)
        act = self.pre_down_point.forward(act.view(*shape[:-1], k * im)).reshape(-1, im)
        if inter is not None:
            inter["pre_down"] = act.view(*shape[:-1], k * im)

        # down per expert, weighted, summed per token (a fresh contiguous tensor: the custom op's fake says so)
        y = xf.new_zeros(xf.shape)
        beg = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            ae = act.index_select(0, order[beg:beg + n])
            if inter is not None:
                inter[f"pre_down.{e}"] = ae
            ye = self.w2[e].forward(ae) * slot_weights[beg:beg + n, None]
            y.index_add_(0, tokens[beg:beg + n], ye.to(y.dtype))
            beg += n
        return y

    def _device_tables(self, x: torch.Tensor):
        """The triton backend's expert tables (ops/triton/moe.py) when this call runs the experts routed on the
        device, else None. It does on a CUDA device (or the CPU under Triton's interpreter) when the experts'
        Triton kernels take it: always in a captured graph's step and its warm-up (runtime/graph_step.py), for
        up to DENSE_ROWS tokens otherwise (decode steps; longer prompts take the grouped path's matmuls), and for
        any count under `ops.set_batch_invariant()`. The tables (or the reason they cannot be built,
        `device_path_declined`) are kept until the experts' kernels or the backend choice change or an expert is
        replaced (an Intervention wrapping it takes the layer off this path); a forward assigned to an expert
        instance by hand is seen when the tables are built, not after."""
        if self.static_routing is not None or "triton" not in dispatch.active_backends() \
                or triton_declines(x.device) is not None:
            return None
        cached = self._tables
        key = (x.dtype, dispatch.generation(), ExLlamaV2Linear.kernel_epoch)
        if cached is not None and cached.key != key and cached.key[:2] == key[:2] and all(
                lin._kernels.get(x.dtype) is k for lin, k in zip(itertools.chain(*cached.experts), cached.kernels)):
            # kernels were prepared somewhere, but these experts' are the ones the tables hold
            cached = self._tables = cached._replace(key=key)
        if cached is None or cached.key != key or cached.experts != (self.w1, self.w3, self.w2):
            # rebuilt when the experts' kernels or the backend choice changed or an expert was replaced (an
            # Intervention wrapping one); list equality is identity here
            experts = self.w1 + self.w3 + self.w2
            if any(type(lin) is not ExLlamaV2Linear or lin.prescale != 1 or "forward" in vars(lin)
                   for lin in experts):
                tables = "an expert linear is wrapped or changed by hand (it runs through its own forward)"
            else:
                tables = expert_tables(self.w1, self.w3, self.w2, self.act, x.dtype)
            self.device_path_declined = tables if isinstance(tables, str) else None
            # the key read after the build, which may have prepared the experts' kernels
            cached = self._tables = _TablesCache(
                (x.dtype, dispatch.generation(), ExLlamaV2Linear.kernel_epoch),
                None if isinstance(tables, str) else tables, (list(self.w1), list(self.w3), list(self.w2)),
                [getattr(lin, "_kernels", {}).get(x.dtype) for lin in experts])
        if x.shape[0] > triton_linear.DENSE_ROWS and not dispatch.batch_invariant() and not in_graph_step(x):
            return None
        return cached.tables

    def _routes_statically(self, x: torch.Tensor) -> bool:
        if self.static_routing is not None:
            return self.static_routing
        if x.device.type == "cpu":
            return False  # a host read costs nothing here; a compiled step runs the grouped path as an opaque op
        return in_graph_step(x)

    def forward_static(self, xf: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, shape) -> torch.Tensor:
        """The experts' weighted sum (T, hidden) with no host sync: every expert over all T tokens (E calls per
        linear, each of T rows), the down projections reading each token's slot for that expert from the
        pre_down tensor (so an intervention's edit there is seen as on the grouped path)."""
        T = xf.shape[0]
        k, im = self.top_k, self.interm_features
        acts = torch.stack([self.act(self.w1[e].forward(xf)) * self.w3[e].forward(xf)
                            for e in range(self.num_experts)])
        act = acts[ids, torch.arange(T, device=xf.device).unsqueeze(1)]  # (T, k, im), routing-rank order
        act = self.pre_down_point.forward(act.view(*shape[:-1], k * im)).reshape(T, k, im)
        y = torch.zeros_like(xf)
        for e in range(self.num_experts):
            picked = ids == e  # (T, k): at most one slot per token
            slot = picked.to(torch.int32).argmax(dim=-1)
            ae = act.gather(1, slot.view(T, 1, 1).expand(T, 1, im))[:, 0]
            w = torch.where(picked, weights, torch.zeros_like(weights)).sum(dim=-1, keepdim=True)
            y += (self.w2[e].forward(ae) * w).to(y.dtype)
        return y

    def _finish(self, y: torch.Tensor, xf: torch.Tensor, shape, residual, inter):
        """Shared expert, post norm, the output hook and the residual, after either routing path."""
        if self.shared_expert is not None:
            s = self.shared_expert.forward(xf)
            if self.shared_gate is not None:
                s = torch.sigmoid(self.shared_gate.forward(xf)) * s
            y = y + s
        y = y.view(shape)
        if self.post_layernorm is not None:
            y = self.post_layernorm.forward(y)
        y = self.out_point.forward(y)
        out = self.add_residual(residual, y)
        if inter is not None:
            inter["hidden_states"] = out
            return inter
        return out
