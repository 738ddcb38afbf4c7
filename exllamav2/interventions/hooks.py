"""Installing and removing hooks: every hook is one `Intervention` layer around the module in its slot, so hooks
stack (the last one added runs outermost) and a removed hook is spliced out of the chain wherever it sits, also
under wrappers added later by someone else. A per-model call tracker (a pre-hook on the first module, present
while any hook is registered) records each forward call's past_len/seq_len and the run's prompt/decode state,
which hooks on sub-modules (linears and norms get no attn_params) read. Whoever runs a packed forward (the
dynamic generator) describes its token streams with `token_streams(model, streams)` around the forward; the
tracker hands them to the hooks with the call."""

from __future__ import annotations

import weakref
from typing import Callable

import torch

from ..module import ExLlamaV2Module, Intervention
from .points import Point, Slot, raw, resolve
from .targets import CallInfo, Target, TokenStreams


class InterventionHook(Intervention):
    """An Intervention placed by exllamav2.interventions (recognised on removal and by leak checks)."""

    def __init__(self, inner, pre_forward=None, post_forward=None, label: str = ""):
        super().__init__(inner, pre_forward, post_forward)
        object.__setattr__(self, "label", label)

    def __repr__(self):
        return f"InterventionHook({self.label}, {self.inner!r})"


def _wrap(slot: Slot, when: str, fn, label: str) -> InterventionHook:
    """Post hooks go outermost, pre hooks innermost, so the hooks at one site run in the order they were added
    (a capture added after an edit sees the edited tensor, on inputs and outputs alike)."""
    top = slot.get()
    if when == "post" or not isinstance(top, Intervention):
        w = InterventionHook(top, fn if when == "pre" else None, fn if when == "post" else None, label)
        slot.set(w)
        return w
    parent = top
    while isinstance(object.__getattribute__(parent, "inner"), Intervention):
        parent = object.__getattribute__(parent, "inner")
    w = InterventionHook(object.__getattribute__(parent, "inner"), fn, None, label)
    parent.inner = w
    return w


def _unwrap(slot: Slot, wrapper: InterventionHook) -> bool:
    top = slot.get()
    if top is wrapper:
        slot.set(object.__getattribute__(wrapper, "inner"))
        return True
    cur = top
    while isinstance(cur, Intervention):
        nxt = object.__getattribute__(cur, "inner")
        if nxt is wrapper:
            cur.inner = object.__getattribute__(wrapper, "inner")  # "inner" is the wrapper's own attribute
            return True
        cur = nxt
    return False


class _ModelState:
    """Call tracking for one model, installed while at least one hook is registered."""

    def __init__(self, model):
        self.model_ref = weakref.ref(model)
        self.users = 0
        self.tracker: tuple | None = None
        self.call = CallInfo()
        self._next_id = 0
        self._decoding = False
        self._step = -1
        self._prompt_end = 0
        self._end = 0
        self.mids: dict = {}
        self.streams: TokenStreams | None = None

    def on_call(self, ids, *args, **kwargs):
        ap = kwargs.get("attn_params")
        b, s = ids.shape[0], ids.shape[1] if ids.dim() > 1 else 1
        if ap is not None:
            past, offsets = ap.past_len, getattr(ap, "position_offsets", None)
        else:
            past = kwargs.get("past_len")
            if past is None:
                cache = kwargs.get("cache")
                past = cache.current_seq_len if cache is not None else 0
            offsets = None
        if past == 0 or past < self._end:  # a new sequence, or the cache was rewound: a new run
            self._decoding, self._step, self._prompt_end = False, -1, 0
        self._end = past + s
        if s == 1 or self._decoding:
            self._decoding = True
            self._step += 1
        else:
            self._prompt_end = past + s
        self._next_id += 1
        self.call = CallInfo(self._next_id, past, s, b, offsets, self._decoding,
                             self._step if self._decoding else -1, self._prompt_end, self.streams)
        return ids

    def acquire(self, model):
        if self.users == 0:
            slot = Slot(model.modules, 0)
            self.tracker = (slot, _wrap(slot, "pre", self.on_call, "call-tracker"))
        self.users += 1

    def release(self):
        self.users -= 1
        if self.users == 0 and self.tracker is not None:
            _unwrap(*self.tracker)
            self.tracker = None


_STATES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def model_state(model) -> _ModelState:
    st = _STATES.get(model)
    if st is None:
        st = _STATES[model] = _ModelState(model)
    return st


class token_streams:
    """`with token_streams(model, streams):` the forwards inside are packed calls with these TokenStreams (a
    stream-bound hook selects its stream's tokens; see targets.py). Restores the previous value on exit."""

    def __init__(self, model, streams: TokenStreams | None):
        self.state = model_state(model)
        self.streams = streams

    def __enter__(self):
        self.prev, self.state.streams = self.state.streams, self.streams
        return self.streams

    def __exit__(self, *exc):
        self.state.streams = self.prev


class _ParallelMid:
    """resid_mid of a parallel block = resid_pre + attn_out, shared by every hook at that point: the hooks run in
    the order they were added on the computed tensor, and the block output moves by (edited - original)."""

    def __init__(self, point: Point, state: "_ModelState", label: str):
        self.fns: list = []
        self.saved: dict = {}
        self.state = state
        fns = (self._keep("pre"), self._keep("attn"), self._finish)
        self.wrappers = [(site.slot, _wrap(site.slot, site.when, f, label)) for site, f in zip(point.sites, fns)]

    def _keep(self, key):
        def f(h, *a, **k):
            self.saved[key] = h
            return h
        return f

    def _finish(self, out, *a, **k):
        pre, attn = self.saved.pop("pre", None), self.saved.pop("attn", None)
        if pre is None or attn is None:
            return out
        mid = pre + attn.to(pre.dtype)
        new = mid
        for fn in list(self.fns):
            new = fn(new, self.state.call)
        return out if new is mid else out + (new - mid).to(out.dtype)

    def remove(self):
        for slot, w in reversed(self.wrappers):
            _unwrap(slot, w)
        self.wrappers.clear()


HookFn = Callable[[torch.Tensor, CallInfo], torch.Tensor]


class Handle:
    """One registered hook function at one point. `remove()` (idempotent) restores the modules; usable as a
    context manager. `rows` may be set at any time to restrict the hook to those batch rows (None = as the
    Target says); `stream` (a key, None = unbound) binds it to one stream of packed forwards instead: it then
    acts only on that stream's tokens, and only in calls that name the stream (see `token_streams`)."""

    def __init__(self, model, point: str | Point, fn: HookFn, label: str = ""):
        self.model = model
        self.point = point if isinstance(point, Point) else resolve(model, point)
        self.fn = fn
        self.rows = None
        self.stream = None
        self._state = model_state(model)
        self._wrappers: list = []
        self._state.acquire(model)
        try:
            self._install(label or self.point.name)
        except BaseException:
            self.remove()
            raise

    def _install(self, label):
        state, fn, p = self._state, self.fn, self.point
        if not p.composite:
            site = p.sites[0]
            hook = lambda h, *a, **k: fn(h, state.call)
            self._wrappers.append((site.slot, _wrap(site.slot, site.when, hook, label)))
            return
        key = p.name
        mid = state.mids.get(key)
        if mid is None:
            mid = state.mids[key] = _ParallelMid(p, state, label)
        mid.fns.append(fn)
        self._mid = (key, fn)

    @property
    def active(self) -> bool:
        return self._state is not None

    def remove(self):
        if self._state is None:
            return
        for slot, w in reversed(self._wrappers):
            _unwrap(slot, w)
        self._wrappers.clear()
        mid = getattr(self, "_mid", None)
        if mid is not None:
            site = self._state.mids[mid[0]]
            site.fns.remove(mid[1])
            if not site.fns:
                site.remove()
                del self._state.mids[mid[0]]
            self._mid = None
        self._state.release()
        self._state = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __repr__(self):
        return f"{type(self).__name__}({self.point.name!r}, active={self.active})"


class EditHandle(Handle):
    """An Edit at a point, restricted by a Target."""

    def __init__(self, model, point, edit, target: Target | None = None):
        self.edit = edit
        self.target = target or Target()
        p = point if isinstance(point, Point) else resolve(model, point)
        w = edit.width() if hasattr(edit, "width") else None
        if w is not None and w != p.width:
            raise ValueError(f"{edit.kind} edit at {p.name!r}: vector has {w} elements, the point is {p.width} wide")
        super().__init__(model, p, self._run, label=f"{p.name}:{getattr(edit, 'kind', 'edit')}")

    def _run(self, h, call):
        if self.stream is not None:
            sel = self.target.select_stream(call, self.stream, h.shape[0], h.shape[1], h.device)
        else:
            sel = self.target.select(call, h.shape[0], h.shape[1], h.device, self.rows)
        return h if sel is None else self.edit.apply(h, sel)


def add_edit(model, point: str, edit, target: Target | None = None, **target_kw) -> EditHandle:
    """Register `edit` at `point` (see points.py for names); `target_kw` builds a Target (positions, rows, steps)."""
    if target is not None and target_kw:
        raise ValueError("give either a Target or positions/rows/steps keywords, not both")
    return EditHandle(model, point, edit, target if target is not None else Target(**target_kw))


def wrapped_slots(model) -> list:
    """Every place in the model that still holds an Intervention (any author): (description, wrapper). Walks
    `model.modules` and, below each, every child module held in an attribute or in a list attribute."""
    found = []
    seen = set()

    def visit(m, where):
        if isinstance(m, Intervention):
            found.append((where, m))
        r = raw(m)
        if id(r) in seen:
            return
        seen.add(id(r))
        for attr, sub in vars(r).items():
            if attr == "model":
                continue
            if isinstance(sub, ExLlamaV2Module):
                visit(sub, f"{where}.{attr}")
            elif isinstance(sub, (list, tuple)):
                for j, item in enumerate(sub):
                    if isinstance(item, ExLlamaV2Module):
                        visit(item, f"{where}.{attr}[{j}]")

    for i, m in enumerate(model.modules):
        visit(m, f"modules[{i}]")
    return found


class InterventionGroup:
    """Several handles removed together; a context manager."""

    def __init__(self, handles=()):
        self.handles = list(handles)

    def add(self, h):
        self.handles.append(h)
        return h

    def remove(self):
        for h in reversed(self.handles):
            h.remove()
        self.handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __iter__(self):
        return iter(self.handles)

    def __len__(self):
        return len(self.handles)


def intervene(model, *edits) -> InterventionGroup:
    """`with intervene(model, (point, edit), (point, edit, target), ...):` registers all, removes all on exit."""
    group = InterventionGroup()
    try:
        for item in edits:
            if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
                raise ValueError(f"intervene: expected (point, edit) or (point, edit, target), got {item!r}")
            group.add(add_edit(model, *item))
    except BaseException:
        group.remove()
        raise
    return group
