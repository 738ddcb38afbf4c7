"""Capturing activations at named points into CPU memory.

Each hook call copies only the selected rows/positions (`h[mask]`, a (n, d) tensor) to a new CPU tensor, so a
capture never aliases a model tensor and never changes afterwards. On CUDA the copy goes into pinned memory with
`non_blocking=True` (results synchronise on first read). The footprint is bounded per point by `max_positions`
(rows x positions kept) and `max_bytes`:
- policy "stop": keep the first ones, drop the rest, warn once and set `truncated`;
- policy "ring": keep the most recent ones, dropping the oldest.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .hooks import Handle, InterventionGroup
from .points import resolve
from .targets import Target

POLICIES = ("stop", "ring")


@dataclass
class CaptureResult:
    """Activations of one point: `values` (n, d) and, per entry, its batch `rows`, token `positions`, cache
    indices `cache_index` and decode `steps` (-1 for prompt calls), in capture order."""

    point: str
    values: torch.Tensor
    rows: torch.Tensor
    positions: torch.Tensor
    cache_index: torch.Tensor
    steps: torch.Tensor

    def __len__(self):
        return self.values.shape[0]

    def for_row(self, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions (k,), values (k, d)) of one row, sorted by position."""
        sel = (self.rows == row).nonzero().flatten()
        order = self.positions[sel].argsort(stable=True)
        sel = sel[order]
        return self.positions[sel], self.values[sel]

    def dense(self, rows=None) -> torch.Tensor:
        """(R, P, d): rows in the given (or sorted) order, positions sorted; every row must hold the same
        positions (use it for unpadded or equally long sequences)."""
        rows = sorted(set(self.rows.tolist())) if rows is None else list(rows)
        out, ref = [], None
        for r in rows:
            pos, vals = self.for_row(r)
            if ref is None:
                ref = pos
            elif not torch.equal(pos, ref):
                raise ValueError(f"capture of {self.point!r}: row {r} holds positions {pos.tolist()[:8]}..., "
                                 f"row {rows[0]} holds {ref.tolist()[:8]}...; dense() needs the same positions")
            out.append(vals)
        if not out:
            return self.values.new_zeros(0, 0, self.values.shape[-1])
        return torch.stack(out)


class _PointStore:
    def __init__(self, name: str, width: int, max_positions: int | None, max_bytes: int | None, policy: str, owner):
        self.name, self.width = name, width
        self.max_positions, self.max_bytes, self.policy = max_positions, max_bytes, policy
        self.owner = owner
        self.chunks: list = []  # (values, rows, positions, cache_index, steps)
        self.count = 0
        self.nbytes = 0
        self.full = False

    def limit_for(self, itemsize: int) -> int | None:
        lims = []
        if self.max_positions is not None:
            lims.append(self.max_positions)
        if self.max_bytes is not None:
            lims.append(self.max_bytes // max(1, self.width * itemsize))
        return min(lims) if lims else None

    def add(self, values, rows, positions, cache_index, steps):
        limit = self.limit_for(values.element_size())
        n = values.shape[0]
        if limit is not None and self.policy == "stop":
            room = limit - self.count
            if room < n:
                self.owner._overflow(self.name)
                if room <= 0:
                    return
                values, rows, positions, cache_index, steps = (t[:room] for t in (values, rows, positions, cache_index, steps))
                n = room
        self.chunks.append((values, rows, positions, cache_index, steps))
        self.count += n
        self.nbytes += values.numel() * values.element_size()
        if limit is not None and self.policy == "stop" and self.count >= limit:
            self.full = True
        if limit is not None and self.policy == "ring":
            while self.count > limit:
                drop = self.count - limit
                first = self.chunks[0]
                k = first[0].shape[0]
                if k <= drop:
                    self.chunks.pop(0)
                else:
                    self.chunks[0] = tuple(t[drop:].clone() for t in first)
                    k = drop
                self.count -= k
                self.nbytes -= k * self.width * first[0].element_size()
                self.owner.dropped += k

    def result(self) -> CaptureResult:
        if self.chunks and self.chunks[0][0].is_pinned():
            torch.cuda.synchronize()
        if not self.chunks:
            e = torch.zeros(0, dtype=torch.long)
            return CaptureResult(self.name, torch.zeros(0, self.width), e, e.clone(), e.clone(), e.clone())
        cols = list(zip(*self.chunks))
        return CaptureResult(self.name, *(torch.cat(c) for c in cols))


class Capture(InterventionGroup):
    """Records activations at one or more points during forward passes until removed (`remove()` or the end of a
    `with` block); results stay readable after removal. `capture[point]` or `capture.result(point)` gives a
    CaptureResult; `capture.points` lists the normalised names."""

    def __init__(self, model, points, target: Target | None = None, max_positions: int | None = 65536,
                 max_bytes: int | None = 256 * 1024 ** 2, policy: str = "stop"):
        super().__init__()
        if policy not in POLICIES:
            raise ValueError(f"capture policy: expected one of {POLICIES}, got {policy!r}")
        for v, n in ((max_positions, "max_positions"), (max_bytes, "max_bytes")):
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise ValueError(f"capture {n}: expected a positive int or None, got {v!r}")
        if isinstance(points, str):
            points = [points]
        self.target = target or Target()
        self.policy = policy
        self.truncated = False
        self.dropped = 0
        self._warned = False
        self.stores: dict[str, _PointStore] = {}
        try:
            for name in points:
                p = resolve(model, name)
                if p.name in self.stores:
                    raise ValueError(f"capture: point {p.name!r} listed twice")
                store = self.stores[p.name] = _PointStore(p.name, p.width, max_positions, max_bytes, policy, self)
                self.add(Handle(model, p, self._hook(store), label=f"{p.name}:capture"))
        except BaseException:
            self.remove()
            raise

    @property
    def points(self) -> list[str]:
        return list(self.stores)

    def set_rows(self, rows):
        for h in self.handles:
            h.rows = rows

    def _overflow(self, name: str):
        self.truncated = True
        if not self._warned:
            self._warned = True
            warnings.warn(f"capture at {name!r} reached its limit (max_positions/max_bytes); later activations are "
                          f"not recorded (policy='stop')", RuntimeWarning, stacklevel=2)

    def _hook(self, store: _PointStore):
        def run(h, call):
            sel = self.target.select(call, h.shape[0], h.shape[1], h.device, self.handles[0].rows if self.handles else None)
            if sel is None:
                return h
            if store.full:
                self._overflow(store.name)
                return h
            b, s = h.shape[0], h.shape[1]
            if sel.mask is None:
                idx_r = torch.arange(b).repeat_interleave(s)
                idx_s = torch.arange(s).repeat(b)
                vals = h.reshape(b * s, -1)
            else:
                nz = sel.mask.nonzero()
                idx_r, idx_s = nz[:, 0].cpu(), nz[:, 1].cpu()
                vals = h[nz[:, 0], nz[:, 1]]
            pos = sel.positions.cpu()[idx_r, idx_s]
            store.add(_to_cpu(vals.detach()), idx_r, pos, idx_s + call.past_len,
                      torch.full_like(idx_r, call.step))
            return h
        return run

    def result(self, point: str) -> CaptureResult:
        from .points import normalize
        name = normalize(point)
        if name not in self.stores:
            raise KeyError(f"capture holds no point {point!r}; it holds {self.points}")
        return self.stores[name].result()

    __getitem__ = result

    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.stores.values())


def _to_cpu(t: torch.Tensor) -> torch.Tensor:
    if t.device.type == "cpu":
        return t.clone()
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t, non_blocking=True)
    return out


def add_capture(model, points, target: Target | None = None, max_positions: int | None = 65536,
                max_bytes: int | None = 256 * 1024 ** 2, policy: str = "stop", **target_kw) -> Capture:
    """Start capturing `points` (a name or list of names); `target_kw` (positions, rows, steps) builds the Target."""
    if target is not None and target_kw:
        raise ValueError("give either a Target or positions/rows/steps keywords, not both")
    return Capture(model, points, target if target is not None else Target(**target_kw), max_positions, max_bytes, policy)
