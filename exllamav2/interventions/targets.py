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

Packed forwards (the dynamic generator puts every job's new tokens into ONE row (1, T)) carry `TokenStreams`:
which token range of the row belongs to which stream (job), and each token's own position in its stream. A hook
bound to a stream (`Handle.stream = key`) touches only that range, and classifies each token by itself: with a
prompt of P tokens, positions 0 .. P-2 are prompt tokens, the token at position P-1+k belongs to decode step k
(its logits give the stream's k-th new token), the same as the padded-batch calls above. A stream hook never
acts in a call that does not name its stream.
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
    streams: "TokenStreams | None" = None  # set for packed calls by whoever runs the forward

    def positions(self, device, b: int, s: int) -> torch.Tensor:
        """(b, s) logical positions: cache index + row offset (negative = left padding)."""
        pos = torch.arange(self.past_len, self.past_len + s, device=device).unsqueeze(0).expand(b, s)
        if self.position_offsets is not None:
            pos = pos + self.position_offsets.to(device).view(-1, 1)[:b]
        return pos


class TokenStreams:
    """The token selector of one packed forward (1, T): stream `keys[i]` owns the contiguous range
    `starts[i] .. starts[i] + q_lens[i] - 1` of the row, continues its own sequence after `past_lens[i]` tokens,
    and has a prompt of `prompt_lens[i]` tokens. `positions` and `steps` (T,) hold, per packed token, its position
    in its own stream and its decode step (-1 for prompt tokens)."""

    def __init__(self, keys: Sequence, past_lens: Sequence[int], q_lens: Sequence[int], prompt_lens: Sequence[int],
                 device="cpu"):
        if not (len(keys) == len(past_lens) == len(q_lens) == len(prompt_lens)):
            raise ValueError("TokenStreams: keys, past_lens, q_lens and prompt_lens must have equal lengths")
        if len(set(keys)) != len(keys):
            raise ValueError("TokenStreams: stream keys must be distinct")
        self.keys = list(keys)
        self.index = {k: i for i, k in enumerate(self.keys)}
        self.q_lens = [int(q) for q in q_lens]
        self.starts = [0] * len(self.q_lens)
        for i in range(1, len(self.q_lens)):
            self.starts[i] = self.starts[i - 1] + self.q_lens[i - 1]
        self.total = sum(self.q_lens)
        ql = torch.tensor(self.q_lens, dtype=torch.long)
        seq = torch.repeat_interleave(torch.arange(len(self.q_lens)), ql)
        within = torch.arange(self.total) - torch.tensor(self.starts, dtype=torch.long)[seq]
        pos = torch.tensor(list(past_lens), dtype=torch.long)[seq] + within
        first_step = torch.tensor(list(prompt_lens), dtype=torch.long)[seq] - 1
        self.positions = pos.to(device)
        self.steps = torch.where(pos >= first_step, pos - first_step, torch.full_like(pos, -1)).to(device)

    @classmethod
    def from_paged(cls, params, keys: Sequence, prompt_lens: Sequence[int]) -> "TokenStreams":
        """From the paged attention parameters of the forward (anything with `past_lens` and `q_lens` lists)."""
        return cls(keys, params.past_lens, params.q_lens, prompt_lens)

    def span(self, key) -> tuple[int, int] | None:
        i = self.index.get(key)
        return None if i is None else (self.starts[i], self.starts[i] + self.q_lens[i])


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
        self._stream_cache: tuple | None = None

    def select_stream(self, call: CallInfo, key, b: int, s: int, device) -> Selection | None:
        """The selection of stream `key`'s tokens in a packed call (see TokenStreams), or None."""
        streams = call.streams
        span = None if streams is None else streams.span(key)
        if span is None:
            return None
        if b != 1 or s != streams.total:
            raise ValueError(f"a packed forward of {streams.total} tokens must give activations (1, {streams.total}, "
                             f"d); this hook got ({b}, {s}, ...)")
        hit = self._stream_cache
        if hit is not None and hit[0] == call.call_id and hit[1] == key and hit[2] == device:
            return hit[3]
        lo, hi = span
        steps = streams.steps[lo:hi]
        kind = self.positions
        keep = None
        if kind == "prompt":
            keep = steps < 0
        elif kind == "generated" or self._steps_set is not None:
            keep = steps >= 0
        if self._steps_set is not None:
            keep = keep & torch.isin(steps, self._tensor("steps", self.steps, steps.device))
        if not isinstance(kind, str):
            pm = torch.isin(streams.positions[lo:hi], self._tensor("positions", kind, steps.device))
            keep = pm if keep is None else keep & pm
        sel = None
        if keep is None or bool(keep.any()):
            mask = torch.zeros(1, s, dtype=torch.bool, device=device)
            mask[0, lo:hi] = True if keep is None else keep.to(device)
            sel = Selection(mask, call, b, s, torch.device(device), streams.positions.to(device).view(1, s))
        self._stream_cache = (call.call_id, key, device, sel)
        return sel

    def _tensor(self, name: str, values, device) -> torch.Tensor:
        key = (name, str(device))
        t = self._pos_cache.get(key)
        if t is None:
            t = self._pos_cache[key] = torch.tensor(values, dtype=torch.long, device=device)
        return t

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
            pm = torch.isin(sel.positions, self._tensor("positions", kind, device))
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
