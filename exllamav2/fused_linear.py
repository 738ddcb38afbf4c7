"""FusedLinear: several linears that read the same input (q/k/v, gate/up) run as one matmul.

Built at load by the attention and MLP modules. The parts stay the API's linears (`q_proj`, ...): LoRA, prescale,
`get_weight` and `load_weight` keep working on them, and setting a part's weight rebuilds the group on next use.
No second copy of the weights is kept:
- dense parts: one (sum of rows, in) tensor, and each part's `weight` becomes a view of its rows;
- GGUF block parts: one GgufWeight over the same file blocks, packed once for the kernel;
- EXL2 / GPTQ parts are not fused (their groups and permutations differ per matrix): each runs its own kernel.
When a part is wrapped by an Intervention, or its forward is replaced on the instance, the owner calls the parts
one by one instead (see `runs`).
"""

from __future__ import annotations

import torch

from . import ops
from .ops import dispatch


class FusedLinear:
    def __init__(self, parts: list, owner=None, names: tuple = ()):
        """`owner` and `names`: where the owning module holds the parts (`attn.q_proj`, ...), so the group can tell
        that one was wrapped by an Intervention."""
        self.parts = list(parts)
        self.owner, self.names = owner, names
        self.sizes = [p.out_features for p in self.parts]
        self.total = sum(self.sizes)
        self.scaled = any(p.prescale != 1 for p in self.parts)  # a part scales its own output
        self.in_features = self.parts[0].in_features
        for p in self.parts:
            p.fused_in.append(self)
        self._kernels: dict = {}
        self._gen = -1
        self._fused = None       # None: not built; False: the parts cannot share a kernel
        self._building = False

    def invalidate(self) -> None:
        if not self._building:
            self._kernels, self._fused = {}, None

    def _build(self) -> None:
        parts = self.parts
        self._building = True
        try:
            self._fused = self._fuse_dense(parts) or self._fuse_gguf(parts) or False
        finally:
            self._building = False

    @staticmethod
    def _fuse_dense(parts):
        ws = [p.weight for p in parts]
        if any(p.q_handle is not None or w is None for p, w in zip(parts, ws)):
            return None
        if len({(w.dtype, w.device, w.shape[1]) for w in ws}) != 1:
            return None
        biases = [p.bias for p in parts]
        # a Parameter, as the parts' weights were, so a frozen compile (compile_decode(freeze=True)) folds it
        w = torch.nn.Parameter(torch.cat([x.data for x in ws]), requires_grad=False)
        b = None
        if any(x is not None for x in biases):
            b = torch.cat([x.data if x is not None else torch.zeros(p.out_features, dtype=w.dtype, device=w.device)
                           for x, p in zip(biases, parts)])
        row = 0
        for p in parts:
            p.weight = torch.nn.Parameter(w.data[row:row + p.out_features], requires_grad=False)
            row += p.out_features
        return w, b, None  # kernels take the Parameter itself

    @staticmethod
    def _fuse_gguf(parts):
        from .quant.gguf import GgufWeight
        qs = [p.q_handle for p in parts]
        if not all(isinstance(q, GgufWeight) for q in qs):
            return None
        q = GgufWeight.concat(parts[0].key + "+", qs, parts[0].dtype, parts[0].device())
        return None if q is None else (None, None, q)

    def _owner_parts(self) -> tuple:
        """The parts as the owner holds them now (an Intervention may wrap one)."""
        return tuple(getattr(self.owner, n) for n in self.names) if self.owner is not None else tuple(self.parts)

    def runs(self, *owners_parts) -> bool:
        """True when the fused kernel may run: every part is still the raw linear (no Intervention around it) and
        nobody replaced its forward on the instance (the converter watches outputs that way). Without arguments,
        the parts are read from the owner."""
        held = owners_parts or self._owner_parts()
        return all(a is b and "forward" not in vars(b) for a, b in zip(held, self.parts))

    def kernel(self, dtype: torch.dtype):
        if self._gen != dispatch._generation:
            self._kernels, self._gen = {}, dispatch._generation
        k = self._kernels.get(dtype)
        if k is None:
            if self._fused is None:
                self._build()
            if self._fused is False:
                k = False
            else:
                dense, bias, quant = self._fused
                k = ops.prepare_linear(dense, bias, quant, self.parts[0].device(), dtype,
                                       name="+".join(p.key.rsplit(".", 1)[-1] for p in self.parts))
            self._kernels[dtype] = k
        return k

    def prepare(self, dtype: torch.dtype) -> None:
        """Build and prepare now (at load); parts that cannot be fused prepare their own kernels."""
        if self.kernel(dtype) is False:
            for p in self.parts:
                p.kernel(dtype)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor | None:
        """The parts' outputs side by side (..., total), before LoRA and prescale; None when the parts cannot share
        a kernel."""
        x = self.parts[0].cast_input(x)
        k = self.kernel(x.dtype)
        if k is False:
            return None
        return k(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.total)

    def forward(self, x: torch.Tensor, loras=None) -> list[torch.Tensor]:
        """Each part's output, as its own forward would give it (the parts run alone, as the owner holds them,
        when one is wrapped or replaced or they cannot share a kernel)."""
        y = self._matmul(x) if self.runs() else None
        if y is None:
            return [p.forward(x, loras=loras) for p in self._owner_parts()]
        return [p.finish(x, o, loras) for p, o in zip(self.parts, y.split(self.sizes, dim=-1))]

    def forward_plain(self, x: torch.Tensor, loras=None) -> torch.Tensor | None:
        """The parts' outputs side by side, (..., total), when nothing acts on one part alone (no LoRA term, no
        prescale, no Intervention or replaced forward, a shared kernel); else None."""
        if loras or self.scaled or not self.runs():
            return None
        return self._matmul(x)

    def nbytes(self) -> int:
        k = self._kernels.get(self.parts[0].dtype)
        return k.nbytes() if k else 0
