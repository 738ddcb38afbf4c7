"""Which batch rows and token positions an edit or capture touches in one forward call.

Every `model.forward_chunk` call covers cache indices `past_len .. past_len + seq_len - 1`. The call tracker
(hooks.py) classifies each call of a run (a run starts at `past_len == 0`, or when the cache was rewound, i.e.
past_len is below the end of the previous call, as when a generator reuses a cached prefix):
- a call with more than one token before the first single-token call is a *prompt* call;
- every single-token call is a *decode step*, numbered 0, 1, ... in the run (so are multi-token calls after
  decoding started, e.g. draft verification: one step per call).
Generators in the ExLlamaV2 style prefill `prompt[:-1]` and feed the last prompt token as step 0; step k then is
the call whose logits give the k-th new token. Explicit positions are each row's own token indices, left padding
excluded (cache index + the row's `position_offsets`); padding positions never match one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

POSITION_KINDS = ("all", "prompt", "generated")


@dataclass
class CallInfo:
    """What the tracker knows about the forward call in progress."""

    call_id: int = 0
    past_len: int = 0
    seq_len: int = 0
    batch_size: int = 0
    position_offsets: torch.Tensor | None = None
    decode: bool = False
    step: int = -1  # decode step index of this call, -1 for prompt calls
    prompt_end: int = 0  # cache index where the run's prompt calls ended

    def positions(self, device, b: int, s: int) -> torch.Tensor:
        """(b, s) logical positions: cache index + row offset (negative = left padding)."""
        pos = torch.arange(self.past_len, self.past_len + s, device=device).unsqueeze(0).expand(b, s)
        if self.position_offsets is not None:
            pos = pos + self.position_offsets.to(device).view(-1, 1)[:b]
        return pos


ALL = "all"  # selection sentinel: every row and position of the call


@dataclass
class Selection:
    """The part of a (b, s, d) activation a hook acts on: `mask` (b, s) bool, or None for everything."""

    mask: torch.Tensor | None
    call: CallInfo
    b: int
    s: int
    device: torch.device
    _pos: torch.Tensor | None = field(default=None, repr=False)

    @property
    def positions(self) -> torch.Tensor:
        if self._pos is None:
            self._pos = self.call.positions(self.device, self.b, self.s)
        return self._pos


RowsArg = None | Sequence[int] | Callable[[], Sequence[int] | None]


@dataclass
class Target:
    """Where an edit or capture acts.

    positions: "all", "prompt", "generated", or a list of token positions (see module doc). Default: "all", or
        "generated" when `steps` is given.
    rows: batch rows (None = all). A callable is called at every forward and returns the rows for that call,
        which lets a batching generator restrict a per-job intervention to the job's current row.
    steps: decode step indices (None = every step); prompt calls never match a steps filter.
    """

    positions: str | Sequence[int] | None = None
    rows: RowsArg = None
    steps: Sequence[int] | None = None

    def __post_init__(self):
        if self.positions is None:
            self.positions = "all" if self.steps is None else "generated"
        if isinstance(self.positions, str):
            if self.positions not in POSITION_KINDS:
                raise ValueError(f"positions: expected one of {POSITION_KINDS} or a list of ints, got {self.positions!r}")
        else:
            self.positions = _int_list(self.positions, "positions")
        if self.rows is not None and not callable(self.rows):
            self.rows = _int_list(self.rows, "rows")
        if self.steps is not None:
            self.steps = _int_list(self.steps, "steps")
        self._steps_set = frozenset(self.steps) if self.steps is not None else None
        self._pos_cache: dict = {}

    def select(self, call: CallInfo, b: int, s: int, device, rows_override=None) -> Selection | None:
        """The selection for one call, or None when nothing is touched."""
        kind = self.positions
        if call.decode:
            if kind == "prompt":
                return None
            if self._steps_set is not None and call.step not in self._steps_set:
                return None
        else:
            if kind == "generated" or self._steps_set is not None:
                return None
        rows = self.rows() if callable(self.rows) else self.rows
        if rows_override is not None:
            rows = rows_override() if callable(rows_override) else rows_override
        mask = None
        if rows is not None:
            rows = [r for r in rows if 0 <= r < b]
            if not rows:
                return None
            if len(rows) < b:
                mask = torch.zeros(b, s, dtype=torch.bool, device=device)
                mask[rows] = True
        sel = Selection(mask, call, b, s, torch.device(device))
        if not isinstance(kind, str):
            key = str(device)
            wanted = self._pos_cache.get(key)
            if wanted is None:
                wanted = self._pos_cache[key] = torch.tensor(kind, dtype=torch.long, device=device)
            pm = torch.isin(sel.positions, wanted)
            sel.mask = pm if sel.mask is None else (sel.mask & pm)
            if not bool(sel.mask.any()):
                return None
        return sel


def _int_list(v, name: str) -> list[int]:
    if isinstance(v, range):
        v = list(v)
    if isinstance(v, torch.Tensor):
        v = v.flatten().tolist()
    if isinstance(v, (str, bytes)) or not hasattr(v, "__iter__"):
        raise ValueError(f"{name}: expected a list of ints, got {v!r}")
    out = []
    for x in v:
        if isinstance(x, bool) or not isinstance(x, int):
            raise ValueError(f"{name}: expected a list of ints, got element {x!r}")
        if x < 0:
            raise ValueError(f"{name}: expected non-negative ints, got {x}")
        out.append(int(x))
    return out
