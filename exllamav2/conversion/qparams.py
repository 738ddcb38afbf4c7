"""Quantization options for one linear layer (survey §4.2, §5.3): a mix of EXL2 widths over the act-ordered rows,
one group size, and the exact stored size of the result."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..quant.exl2 import EXL2_WIDTHS

HEAD_BITS = (2, 3, 4, 5, 6, 8)


@dataclass(frozen=True)
class QuantOption:
    """bits: widths in descending order; props: the share of rows each width takes (in act-order, so the widest
    rows go to the input features with the largest Hessian diagonal); group_size: rows per scale group."""

    bits: tuple[int, ...]
    props: tuple[float, ...]
    group_size: int

    def __post_init__(self):
        if not self.bits or len(self.bits) != len(self.props):
            raise ValueError(f"QuantOption: bits {self.bits} and props {self.props} must be non-empty and the same length")
        if any(b not in EXL2_WIDTHS for b in self.bits) or list(self.bits) != sorted(self.bits, reverse=True):
            raise ValueError(f"QuantOption: bits must be EXL2 widths {EXL2_WIDTHS} in descending order, got {self.bits}")
        if self.group_size not in (32, 64, 128):
            raise ValueError(f"QuantOption: group_size must be 32, 64 or 128, got {self.group_size}")

    def groups(self, rows: int) -> list[tuple[int, int]]:
        """[(bits, rows)] per scale group, covering `rows` input features in quantized order. Width b takes
        ceil(min(rows * p_b, remaining) / gs) groups of gs rows; only the tensor's last group may be shorter.
        Group starts are multiples of group_size (the quantizer relies on it)."""
        out: list[tuple[int, int]] = []
        remaining = rows
        for i, (b, p) in enumerate(zip(self.bits, self.props)):
            want = remaining if i == len(self.bits) - 1 else min(math.ceil(rows * p - 1e-9), remaining)
            n_groups = math.ceil(want / self.group_size)
            for _ in range(n_groups):
                r = min(self.group_size, remaining)
                if r <= 0:
                    break
                out.append((b, r))
                remaining -= r
        return out

    def total_bits(self, rows: int, cols: int) -> int:
        """Stored bits as exl2_bits_per_weight counts them: q_weight, q_scale, q_scale_max, q_groups, q_invperm."""
        cols_pad = -(-cols // 32) * 32
        groups = self.groups(rows)
        qrows = sum((r * b + 31) // 32 for b, r in groups)
        return qrows * cols_pad * 32 + len(groups) * (cols_pad // 8 * 32 + 16 + 32) + rows * 32

    def bpw(self, rows: int, cols: int) -> float:
        return self.total_bits(rows, cols) / (rows * cols)

    def to_dict(self) -> dict:
        return {"bits": list(self.bits), "props": list(self.props), "group_size": self.group_size}

    @classmethod
    def from_dict(cls, d: dict) -> "QuantOption":
        return cls(tuple(int(b) for b in d["bits"]), tuple(float(p) for p in d["props"]), int(d["group_size"]))

    def __str__(self) -> str:
        mix = "/".join(f"{b}:{p:g}" for b, p in zip(self.bits, self.props))
        return f"[{mix}] g{self.group_size}"


def _o(bits, props, gs) -> QuantOption:
    return QuantOption(tuple(bits), tuple(props), gs)


# A smaller set than the original's 13-15 per projection, dense around the usual targets (3, 4, 5, 6, 8 bpw). Group 32
# matters at 3-5 bits: on SmolLM2-135M, 4-bit g32 halves the perplexity loss of 4-bit g128 for +0.1 bpw.
CANDIDATES: tuple[QuantOption, ...] = (
    _o([3, 2], [0.5, 0.5], 32),
    _o([3], [1.0], 64),
    _o([3], [1.0], 32),
    _o([4, 3], [0.5, 0.5], 64),
    _o([4, 3], [0.5, 0.5], 32),
    _o([4], [1.0], 128),
    _o([4], [1.0], 32),
    _o([5, 4], [0.5, 0.5], 64),
    _o([5, 4], [0.5, 0.5], 32),
    _o([5], [1.0], 128),
    _o([6, 5], [0.5, 0.5], 128),
    _o([6], [1.0], 128),
    _o([8, 6], [0.25, 0.75], 128),
    _o([8, 6], [0.5, 0.5], 128),
    _o([8, 6], [0.75, 0.25], 128),
    _o([8], [1.0], 128),
)


# A linear may also stay unquantized (fp16 `.weight`, which the original's loader and ours read beside EXL2 ones).
# It lets a target above the widest option's 8.08 bpw be spent (llama.cpp's Q8_0 is 8.5 bpw), on the linears whose
# 8-bit error costs the loss most.
UNQUANTIZED = {"unquantized": "fp16"}
UNQUANTIZED_BITS = 16


def is_unquantized(option: dict) -> bool:
    return option.get("unquantized") == "fp16"


def describe(option: dict) -> str:
    return "fp16 (unquantized)" if is_unquantized(option) else str(QuantOption.from_dict(option))


def head_option(head_bits: int) -> QuantOption:
    if head_bits not in HEAD_BITS:
        raise ValueError(f"head bits must be one of {list(HEAD_BITS)}, got {head_bits}")
    return _o([head_bits], [1.0], 128)
