"""Small helpers from the original's public API: `Timer` and `SeqTensor`."""

from __future__ import annotations

import time

import torch


class Timer:
    """Context manager timing its block: `start_time`, `end_time` and `interval` (seconds)."""

    start_time: float
    end_time: float
    interval: float

    def __enter__(self) -> Timer:
        self.start_time = time.perf_counter()
        return self

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        self.end_time = time.perf_counter()
        self.interval = self.end_time - self.start_time


class SeqTensor:
    """A tensor that grows along one axis (`seq_dim`) by appending, over storage reserved in pages of
    PAGE_SIZE positions so that appends rarely copy. `torch()` is a view of the filled part."""

    PAGE_SIZE = 256

    tensor: torch.Tensor
    seq_dim: int
    seq_len: int
    seq_cap: int

    def __init__(self, shape: tuple, dtype: torch.dtype, seq_dim: int, device: torch.device | str = "cpu",
                 init_cap: int = -1):
        shape = list(shape)
        if not -len(shape) <= seq_dim < len(shape):
            raise ValueError(f"SeqTensor: seq_dim {seq_dim} is out of range for a {len(shape)}-D shape")
        self.seq_dim = seq_dim % len(shape)
        self.seq_len = 0
        self.seq_cap = self._pages_for(max(init_cap, 1)) if init_cap != -1 else self.PAGE_SIZE
        shape[self.seq_dim] = self.seq_cap
        self.tensor = torch.empty(shape, dtype=dtype, device=device)

    def _pages_for(self, length: int) -> int:
        return -(-length // self.PAGE_SIZE) * self.PAGE_SIZE

    def __len__(self) -> int:
        return self.seq_len

    def __bool__(self) -> bool:
        return self.seq_len > 0

    @staticmethod
    def from_tensor(tensor: torch.Tensor, seq_dim: int) -> SeqTensor:
        s = SeqTensor(tensor.shape, tensor.dtype, seq_dim, tensor.device, init_cap=tensor.shape[seq_dim])
        s.append(tensor)
        return s

    def clone(self, drop: int | None = None) -> SeqTensor:
        """A copy; with `drop`, without the last `drop` positions."""
        if drop and drop <= self.seq_len:
            return SeqTensor.from_tensor(self.torch_slice(None, self.seq_len - drop), self.seq_dim)
        return SeqTensor.from_tensor(self.torch(), self.seq_dim)

    def clear(self) -> None:
        self.seq_len = 0

    def set(self, new_data: SeqTensor | torch.Tensor | None = None) -> None:
        self.clear()
        self.append(new_data)

    def append(self, new_data: SeqTensor | torch.Tensor | None) -> None:
        if new_data is None:
            return
        if isinstance(new_data, SeqTensor):
            new_data = new_data.torch()
        expected = list(self.tensor.shape)
        got = list(new_data.shape)
        if len(got) != len(expected) or any(g != e for d, (g, e) in enumerate(zip(got, expected)) if d != self.seq_dim):
            expected[self.seq_dim] = "*"
            raise ValueError(f"SeqTensor.append: expected shape {tuple(expected)}, got {tuple(got)}")
        end = self.seq_len + new_data.shape[self.seq_dim]
        if end > self.seq_cap:
            grow = list(expected)
            grow[self.seq_dim] = self._pages_for(end) - self.seq_cap
            extra = torch.empty(grow, dtype=self.tensor.dtype, device=self.tensor.device)
            self.tensor = torch.cat((self.tensor, extra), dim=self.seq_dim)
            self.seq_cap = self.tensor.shape[self.seq_dim]
        self.tensor.narrow(self.seq_dim, self.seq_len, end - self.seq_len).copy_(new_data)
        self.seq_len = end

    def truncate(self, new_len: int) -> None:
        if not 0 <= new_len <= self.seq_len:
            raise ValueError(f"SeqTensor.truncate: new length {new_len} is outside 0..{self.seq_len}")
        self.seq_len = new_len

    def torch(self) -> torch.Tensor:
        return self.tensor.narrow(self.seq_dim, 0, self.seq_len)

    def slice(self, a: int | None, b: int | None) -> SeqTensor:
        return SeqTensor.from_tensor(self.torch_slice(a, b), self.seq_dim)

    def torch_slice(self, a: int | None, b: int | None) -> torch.Tensor:
        """A view of positions a..b of the filled part (Python slice rules, negatives included)."""
        start, stop, _ = slice(a, b).indices(self.seq_len)
        return self.tensor.narrow(self.seq_dim, start, max(stop - start, 0))


def release_freed_memory() -> None:
    """Hand memory freed by the load's temporaries back to the OS. Packing weights allocates many mid-sized
    buffers that glibc keeps in its heap after they are freed (SmolLM2's load left ~700 MB resident that way);
    malloc_trim returns it. A no-op where glibc is not the allocator."""
    import ctypes
    import ctypes.util
    import sys
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
