"""Per-request interventions as plain, serialisable data.

An `InterventionSpec` describes one edit: where (`point`), what (`edit` kind with `vector` or `file`, `scale`,
`min`/`max`), and when (`positions`, `steps`, `rows`). `from_request(model, [dict, ...])` validates a request's
list and returns specs; `register_specs(model, specs, rows=...)` installs them (for a batching generator, pass the
job's row(s), or a callable returning them at each forward, so the edit touches only that job).

Dict form, e.g. {"point": "blocks.12.resid_post", "edit": "add", "file": "happy.safetensors", "scale": 4.0,
"positions": "generated"}. Kinds: add (vector|file, scale), project_out (vector|file), clamp (min and/or max,
optional vector = direction), scale (scale = factor), zero, replace (vector|file: the value to write).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields

import torch

from .edits import EDIT_KINDS, AddVector, Clamp, ProjectOut, Replace, Scale, Zero
from .hooks import InterventionGroup, add_edit
from .points import UnknownPointError, resolve
from .steering import SteeringVectors
from .targets import POSITION_KINDS, Target

NEEDS_VECTOR = ("add", "project_out", "replace")


class InterventionRequestError(ValueError):
    pass


@dataclass
class InterventionSpec:
    point: str
    edit: str
    vector: list | None = None
    file: str | None = None
    scale: float = 1.0
    min: float | None = None
    max: float | None = None
    positions: str | list | None = None
    steps: list | None = None
    rows: list | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict, where: str = "intervention") -> "InterventionSpec":
        if not isinstance(d, dict):
            raise InterventionRequestError(f"{where}: expected an object, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InterventionRequestError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(known)}")
        for req in ("point", "edit"):
            if req not in d:
                raise InterventionRequestError(f"{where}: missing required field {req!r}")
        return cls(**d)

    # ------------------------------------------------------------------ validation and building

    def validate(self, model, where: str = "intervention", file_root: str | None = None) -> None:
        _check(isinstance(self.point, str), where, "point", f"expected a string, got {self.point!r}")
        try:
            p = resolve(model, self.point)
        except UnknownPointError as e:
            raise InterventionRequestError(f"{where}.point: {e}") from None
        _check(self.edit in EDIT_KINDS, where, "edit", f"expected one of {sorted(EDIT_KINDS)}, got {self.edit!r}")
        _check(_is_num(self.scale), where, "scale", f"expected a finite number, got {self.scale!r}")
        for k in ("min", "max"):
            v = getattr(self, k)
            _check(v is None or _is_num(v), where, k, f"expected a finite number, got {v!r}")
        has_vec = self.vector is not None or self.file is not None
        _check(not (self.vector is not None and self.file is not None), where, "vector",
               "give either vector or file, not both")
        if self.edit in NEEDS_VECTOR:
            _check(has_vec, where, "vector", f"edit {self.edit!r} needs a vector or a file")
        elif self.edit in ("scale", "zero"):
            _check(not has_vec, where, "vector", f"edit {self.edit!r} takes no vector")
        if self.edit == "clamp":
            _check(self.min is not None or self.max is not None, where, "min", "clamp needs min, max or both")
            _check(self.min is None or self.max is None or self.min <= self.max, where, "min",
                   f"min {self.min} is larger than max {self.max}")
        if has_vec:
            v = self.load_vector(model, where, file_root)
            _check(v.numel() == p.width, where, "vector", f"has {v.numel()} elements, point {p.name!r} is {p.width} wide")
        try:
            self.target()
        except ValueError as e:
            raise InterventionRequestError(f"{where}: {e}") from None

    def load_vector(self, model, where: str = "intervention", file_root: str | None = None) -> torch.Tensor:
        if self.vector is not None:
            v = self.vector
            _check(isinstance(v, (list, tuple)) and v and all(_is_num(x) for x in v), where, "vector",
                   "expected a non-empty list of finite numbers")
            return torch.tensor(v, dtype=torch.float32)
        path = self.file
        _check(isinstance(path, str) and path, where, "file", f"expected a path, got {path!r}")
        if file_root is not None:
            root = os.path.realpath(file_root)
            path = os.path.realpath(os.path.join(root, path))
            _check(path.startswith(root + os.sep), where, "file", f"{self.file!r} is outside the allowed folder")
        _check(os.path.isfile(path), where, "file", f"{self.file!r} does not exist")
        try:
            sv = _load_cached(path)
        except Exception as e:  # the message names the file as the request did, never the server's own path
            msg = str(e)
            if file_root is not None:
                root = os.path.realpath(file_root)
                msg = msg.replace(path, os.path.relpath(path, root)).replace(root, "<interventions_dir>")
            raise InterventionRequestError(f"{where}.file: {msg}") from None
        name = resolve(model, self.point).name
        layer = int(name.split(".")[1]) if name.startswith("blocks.") else None
        _check(layer in sv.vectors, where, "file", f"{self.file!r} holds layers {sv.layers}, not the layer of {name!r}")
        return sv.vectors[layer].float()

    def target(self) -> Target:
        return Target(positions=self.positions, rows=self.rows, steps=self.steps)

    def build_edit(self, model, file_root: str | None = None):
        k = self.edit
        if k == "add":
            return AddVector(self.load_vector(model, file_root=file_root), self.scale)
        if k == "project_out":
            return ProjectOut(self.load_vector(model, file_root=file_root))
        if k == "replace":
            return Replace(self.load_vector(model, file_root=file_root) * self.scale)
        if k == "clamp":
            d = self.load_vector(model, file_root=file_root) if (self.vector is not None or self.file) else None
            return Clamp(self.min, self.max, d)
        if k == "scale":
            return Scale(self.scale)
        return Zero()


def _is_num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(ok: bool, where: str, field_name: str, msg: str):
    if not ok:
        raise InterventionRequestError(f"{where}.{field_name}: {msg}")


_FILE_CACHE: dict = {}


def _load_cached(path: str) -> SteeringVectors:
    key = (path, os.path.getmtime(path))
    sv = _FILE_CACHE.get(key)
    if sv is None:
        sv = _FILE_CACHE[key] = SteeringVectors.load(path)
    return sv


def from_request(model, items, file_root: str | None = None) -> list[InterventionSpec]:
    """Validate a request's list of intervention dicts (or specs) for `model`. Raises InterventionRequestError
    naming the item and field. With `file_root`, `file` paths must lie inside that folder (servers should set it)."""
    if items is None:
        return []
    if not isinstance(items, (list, tuple)):
        raise InterventionRequestError(f"interventions: expected a list, got {type(items).__name__}")
    specs = []
    for i, d in enumerate(items):
        where = f"interventions[{i}]"
        spec = d if isinstance(d, InterventionSpec) else InterventionSpec.from_dict(d, where)
        spec.validate(model, where, file_root)
        specs.append(spec)
    return specs


def register_specs(model, specs, rows=None, file_root: str | None = None, stream=None) -> InterventionGroup:
    """Install validated specs; `rows` (list or callable) overrides each spec's rows at run time. With `stream`
    (a key), the edits act only on that stream's tokens of packed forwards (see `token_streams`), with positions
    and steps counted per stream; a spec's `rows` is then ignored."""
    group = InterventionGroup()
    try:
        for s in specs:
            h = group.add(add_edit(model, s.point, s.build_edit(model, file_root), s.target()))
            h.rows = rows
            h.stream = stream
    except BaseException:
        group.remove()
        raise
    return group
