"""Edits: pure functions of an activation (b, s, d) and a Selection, returning a new tensor (inputs are never
modified in place). Each edit can be applied to any rows/positions passed at run time through the Selection,
so a batching generator can restrict one request's edit to that request's row."""

from __future__ import annotations

import torch

from .targets import Selection


class Edit:
    kind = ""

    def compute(self, h: torch.Tensor, sel: Selection) -> torch.Tensor:
        """The edited tensor for every position (the mask is applied by `apply`)."""
        raise NotImplementedError

    def apply(self, h: torch.Tensor, sel: Selection) -> torch.Tensor:
        new = self.compute(h, sel)
        if sel.mask is None:
            return new
        return torch.where(sel.mask.unsqueeze(-1), new, h)

    def width(self) -> int | None:
        """The activation width this edit needs (None = any)."""
        return None

    def _on(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        # vectors are kept per (device, dtype) so the hot path does no conversions
        key = (like.device, like.dtype)
        cache = self.__dict__.setdefault("_conv", {})
        v = cache.get(key)
        if v is None:
            v = cache[key] = t.to(device=like.device, dtype=like.dtype)
        return v

    def __call__(self, h: torch.Tensor, sel: Selection) -> torch.Tensor:
        return self.apply(h, sel)


def _vector(v, name: str) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=torch.float32) if not isinstance(v, torch.Tensor) else v.detach().float().cpu()
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"{name}: expected a 1-D vector, got shape {list(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: vector has non-finite values")
    return t.clone()


class AddVector(Edit):
    """h + scale * vector (steering)."""

    kind = "add"

    def __init__(self, vector, scale: float = 1.0):
        self.vector = _vector(vector, "add.vector")
        self.scale = float(scale)

    def width(self):
        return self.vector.numel()

    def compute(self, h, sel):
        return h + self._on(self.vector * self.scale, h)


class ProjectOut(Edit):
    """Remove the component along `direction`: h - (h . u) u with u = direction / |direction| (in fp32)."""

    kind = "project_out"

    def __init__(self, direction):
        d = _vector(direction, "project_out.direction")
        n = d.norm()
        if n == 0:
            raise ValueError("project_out.direction: the zero vector has no direction")
        self.direction = d / n

    def width(self):
        return self.direction.numel()

    def compute(self, h, sel):
        u = self._on(self.direction, h.float())
        hf = h.float()
        return (hf - (hf @ u).unsqueeze(-1) * u).to(h.dtype)


class Clamp(Edit):
    """Clamp every element to [min, max]; with `direction`, clamp only the coefficient along it."""

    kind = "clamp"

    def __init__(self, min: float | None = None, max: float | None = None, direction=None):
        if min is None and max is None:
            raise ValueError("clamp: give min, max or both")
        if min is not None and max is not None and min > max:
            raise ValueError(f"clamp: min {min} is larger than max {max}")
        self.min, self.max = min, max
        self.direction = None
        if direction is not None:
            d = _vector(direction, "clamp.direction")
            if d.norm() == 0:
                raise ValueError("clamp.direction: the zero vector has no direction")
            self.direction = d / d.norm()

    def width(self):
        return None if self.direction is None else self.direction.numel()

    def compute(self, h, sel):
        if self.direction is None:
            return h.clamp(self.min, self.max)
        u = self._on(self.direction, h.float())
        hf = h.float()
        c = hf @ u
        return (hf + (c.clamp(self.min, self.max) - c).unsqueeze(-1) * u).to(h.dtype)


class Scale(Edit):
    kind = "scale"

    def __init__(self, factor: float):
        self.factor = float(factor)

    def compute(self, h, sel):
        return h * self.factor


class Zero(Edit):
    kind = "zero"

    def compute(self, h, sel):
        return torch.zeros_like(h)


class Replace(Edit):
    """Replace with stored activations (patching). `values`:
    (d,) the same vector everywhere; (T, d) indexed by token position; (B, T, d) indexed by batch row and token
    position (what `CaptureResult.dense()` returns). Positions beyond T are left unchanged."""

    kind = "replace"

    def __init__(self, values: torch.Tensor):
        v = torch.as_tensor(values).detach()
        if v.dim() not in (1, 2, 3) or v.numel() == 0:
            raise ValueError(f"replace.values: expected (d,), (T, d) or (B, T, d), got shape {list(v.shape)}")
        self.values = v.float().cpu().clone()

    def width(self):
        return self.values.shape[-1]

    def apply(self, h, sel):
        v = self._on(self.values, h)
        if v.dim() == 1:
            return super().apply(h, sel)
        pos = sel.positions
        b = h.shape[0]
        if v.dim() == 3 and v.shape[0] < b:
            raise ValueError(f"replace.values holds {v.shape[0]} rows, the batch has {b}")
        T = v.shape[-2]
        valid = (pos >= 0) & (pos < T)
        if sel.mask is not None:
            valid = valid & sel.mask
        idx = pos.clamp(0, T - 1)
        if v.dim() == 2:
            new = v[idx]
        else:
            new = v[torch.arange(b, device=h.device).unsqueeze(1), idx]
        return torch.where(valid.unsqueeze(-1), new, h)

    def compute(self, h, sel):
        return self._on(self.values, h).expand_as(h)


EDIT_KINDS = {c.kind: c for c in (AddVector, ProjectOut, Clamp, Scale, Zero, Replace)}
