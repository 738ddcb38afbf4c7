"""EXL2 weight format (survey §4.1-4.5, §4.10): parse, validate, unpack, dequantise, and write.

On disk, per linear layer: q_weight (qrows, out_pad) int32, q_invperm (in,) int32, q_scale (groups, out_pad/8) int32,
q_scale_max (groups,) fp16, q_groups (2*groups,) int16 pairs [bits, qrow_start], optional bias (out,).
The spec's matrix is (in, out); every function here that returns a matrix returns nn.Linear layout (out, in).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .bitstream import pack_bitstream, pack_nibble_columns, unpack_bitstream, unpack_nibble_columns

EXL2_WIDTHS = (8, 6, 5, 4, 3, 2)
EXL2_REQUIRED = ("q_weight", "q_scale", "q_scale_max", "q_groups")


class QuantFormatError(ValueError):
    """A quantized tensor set that does not follow its format; the message names the tensor."""


@dataclass(frozen=True)
class Exl2Layout:
    """Where every quantized row lives. Rows are in quantized (permuted) order. Only the per-group fields are
    stored; the per-row ones are derived on use (a loaded model keeps no per-row int64 tables)."""

    bits: torch.Tensor        # (groups,) int64
    qrow_start: torch.Tensor  # (groups,) int64, first q_weight row of the group
    rows: torch.Tensor        # (groups,) int64, matrix rows in the group

    @property
    def row_group(self) -> torch.Tensor:
        """(in,) int64, group of each quantized row."""
        return torch.repeat_interleave(torch.arange(len(self.bits)), self.rows)

    @property
    def row_bits(self) -> torch.Tensor:
        """(in,) int64."""
        return torch.repeat_interleave(self.bits, self.rows)

    @property
    def bit_offset(self) -> torch.Tensor:
        """(in,) int64, stream position of each row within its column."""
        row_group = self.row_group
        within = torch.arange(self.in_features) - (torch.cumsum(self.rows, 0) - self.rows)[row_group]
        return self.qrow_start[row_group] * 32 + within * self.bits[row_group]

    @property
    def in_features(self) -> int:
        return int(self.rows.sum())

    @property
    def num_groups(self) -> int:
        return int(self.bits.shape[0])


def _name(key: str, tensor: str) -> str:
    return f"{key}.{tensor}" if key else tensor


def parse_q_groups(q_groups: torch.Tensor, num_qrows: int, in_features: int, key: str = "") -> Exl2Layout:
    """Decode q_groups against the q_weight height and the number of input features (the length of q_invperm).

    The last group's row count is whatever remains of in_features (as the CUDA QMatrix does); it must need exactly
    the q_weight rows it was given.
    """
    name = _name(key, "q_groups")
    if q_groups.dim() != 1 or q_groups.numel() == 0 or q_groups.numel() % 2:
        raise QuantFormatError(f"{name}: expected a non-empty 1-D tensor of [bits, qrow_start] pairs, got shape {tuple(q_groups.shape)}")
    pairs = (q_groups.to(torch.int64).cpu() & 0xFFFF).view(-1, 2)  # stored int16, read as uint16
    bits, starts = pairs[:, 0], pairs[:, 1]
    unknown = sorted({int(b) for b in bits} - set(EXL2_WIDTHS))
    if unknown:
        raise QuantFormatError(f"{name}: unknown bit width(s) {unknown}; EXL2 widths are {list(EXL2_WIDTHS)}")
    if (bits[1:] > bits[:-1]).any():
        raise QuantFormatError(f"{name}: bit widths must be in descending order, got {bits.tolist()}")
    if int(starts[0]) != 0:
        raise QuantFormatError(f"{name}: the first group must start at q_weight row 0, got {int(starts[0])}")
    ends = torch.cat([starts[1:], torch.tensor([num_qrows])])
    qrows = ends - starts
    if (qrows <= 0).any():
        raise QuantFormatError(f"{name}: qrow_start values must increase and stay below the q_weight height {num_qrows}, got {starts.tolist()}")
    inner = qrows[:-1] * 32
    if (inner % bits[:-1]).any():
        g = int((inner % bits[:-1]).nonzero()[0])
        raise QuantFormatError(f"{name}: group {g} has {int(qrows[g])} q_weight rows, not a whole number of {int(bits[g])}-bit rows")
    rows = torch.cat([inner // bits[:-1], torch.zeros(1, dtype=torch.int64)])
    last_rows = in_features - int(rows[:-1].sum())
    last_bits = int(bits[-1])
    if last_rows <= 0 or (last_rows * last_bits + 31) // 32 != int(qrows[-1]):
        raise QuantFormatError(
            f"{name}: row counts do not add up: the groups before the last hold {int(rows[:-1].sum())} rows, "
            f"leaving {last_rows} of {in_features} input features for a last group of {int(qrows[-1])} {last_bits}-bit q_weight rows"
        )
    rows[-1] = last_rows
    return Exl2Layout(bits, starts, rows)


def exl2_group_map(layout: Exl2Layout) -> torch.Tensor:
    """The derived q_group_map: (2*in,) int16 of [group index, rows left in the group] per quantized row."""
    row_start = torch.cumsum(layout.rows, 0) - layout.rows
    within = torch.arange(layout.in_features) - row_start[layout.row_group]
    left = layout.rows[layout.row_group] - within
    return torch.stack([layout.row_group, left], 1).reshape(-1).to(torch.int16)


def perm_from_invperm(q_invperm: torch.Tensor, key: str = "") -> torch.Tensor:
    """q_perm = argsort(q_invperm), after checking that q_invperm is a permutation of 0..in-1."""
    inv = q_invperm.to(torch.int64).reshape(-1)
    if q_invperm.dim() != 1 or not torch.equal(torch.sort(inv).values, torch.arange(inv.numel(), device=inv.device)):
        raise QuantFormatError(f"{_name(key, 'q_invperm')}: expected a permutation of 0..{inv.numel() - 1}")
    return torch.argsort(inv)


@dataclass(frozen=True)
class Exl2Tensors:
    """A validated EXL2 tensor set with its derived layout."""

    q_weight: torch.Tensor
    q_perm: torch.Tensor      # (in,) int64 (int32 once loaded): quantized row k holds original input feature q_perm[k]
    q_invperm: torch.Tensor | None  # (in,) int64; None once loaded (q_perm says the same)
    q_scale: torch.Tensor
    q_scale_max: torch.Tensor
    layout: Exl2Layout
    out_features: int
    bias: torch.Tensor | None

    @property
    def in_features(self) -> int:
        return self.layout.in_features

    @property
    def out_pad(self) -> int:
        return int(self.q_weight.shape[1])


def strip_prefix(tensors: dict[str, torch.Tensor], key: str) -> dict[str, torch.Tensor]:
    """Accept both {"q_weight": ...} and {"<key>.q_weight": ...}."""
    prefix = key + "." if key else ""
    return {(k[len(prefix):] if prefix and k.startswith(prefix) else k): v for k, v in tensors.items()}


def read_exl2(tensors: dict[str, torch.Tensor], key: str = "", in_features: int | None = None,
              out_features: int | None = None) -> Exl2Tensors:
    """Validate an EXL2 tensor set; in/out features are checked against the tensors when given."""
    t = strip_prefix(tensors, key)
    missing = [n for n in EXL2_REQUIRED if n not in t]
    if missing:
        raise QuantFormatError(f"{key}: EXL2 tensor(s) missing: {', '.join(_name(key, m) for m in missing)}")
    q_weight = t["q_weight"]
    if q_weight.dim() != 2 or q_weight.dtype not in (torch.int32, torch.uint32):
        raise QuantFormatError(f"{_name(key, 'q_weight')}: expected a 2-D int32 tensor, got {q_weight.dtype} {tuple(q_weight.shape)}")
    q_weight = q_weight.view(torch.int32) if q_weight.dtype == torch.uint32 else q_weight
    out_pad = q_weight.shape[1]
    if out_pad % 32:
        raise QuantFormatError(f"{_name(key, 'q_weight')}: width {out_pad} is not a multiple of 32 (out padded to 32)")
    if "q_invperm" in t:
        q_perm = perm_from_invperm(t["q_invperm"], key)
        q_invperm = t["q_invperm"].to(torch.int64)
        if in_features is not None and q_invperm.numel() != in_features:
            raise QuantFormatError(f"{_name(key, 'q_invperm')}: length {q_invperm.numel()} but the layer has {in_features} input features")
    elif in_features is not None:
        q_perm = q_invperm = torch.arange(in_features)
    else:
        raise QuantFormatError(f"{_name(key, 'q_invperm')}: missing, and in_features was not given")
    n_in = q_perm.numel()
    layout = parse_q_groups(t["q_groups"], q_weight.shape[0], n_in, key)
    groups = layout.num_groups
    q_scale = t["q_scale"]
    if tuple(q_scale.shape) != (groups, out_pad // 8):
        raise QuantFormatError(f"{_name(key, 'q_scale')}: shape {tuple(q_scale.shape)} disagrees with q_groups/q_weight, expected {(groups, out_pad // 8)}")
    q_scale_max = t["q_scale_max"]
    if tuple(q_scale_max.shape) != (groups,):
        raise QuantFormatError(f"{_name(key, 'q_scale_max')}: shape {tuple(q_scale_max.shape)} disagrees with q_groups, expected {(groups,)}")
    out = out_pad if out_features is None else out_features
    if not out_pad - 32 < out <= out_pad:
        raise QuantFormatError(f"{_name(key, 'q_weight')}: width {out_pad} is not {out} output features padded to 32")
    bias = t.get("bias")
    if bias is not None:
        if bias.dim() != 1 or bias.numel() not in (out, out_pad):
            raise QuantFormatError(f"{_name(key, 'bias')}: shape {tuple(bias.shape)}, expected ({out},)")
        bias = bias[:out]
    return Exl2Tensors(q_weight, q_perm, q_invperm, q_scale.view(torch.int32) if q_scale.dtype == torch.uint32 else q_scale,
                       q_scale_max, layout, out, bias)


def exl2_codes(e: Exl2Tensors) -> torch.Tensor:
    """Unsigned codes (in, out_pad) int64 in quantized row order."""
    return unpack_bitstream(e.q_weight, e.layout.bit_offset, e.layout.row_bits)


def exl2_scales(e: Exl2Tensors, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Effective per-(group, column) scales (groups, out_pad).

    fp16 reproduces the original bit for bit: q_scale_max is pre-multiplied by 1/256 in fp16, then
    (code+1)^2 * that is rounded to fp16 once. Both products are exact in fp32, so fp32-multiply-then-round equals
    the CUDA __hmul.
    """
    codes = unpack_nibble_columns(e.q_scale)
    sq = ((codes + 1) ** 2).to(torch.float32)
    if dtype == torch.float16:
        smax = (e.q_scale_max.to(torch.float16) * (1 / 256)).to(torch.float32)
        return (sq * smax.to(sq.device).unsqueeze(1)).to(torch.float16)
    smax = e.q_scale_max.to(torch.float32) / 256
    return sq * smax.to(sq.device).unsqueeze(1)


def exl2_dequantize_quantized_order(e: Exl2Tensors, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """(in, out_pad) in the spec's layout and quantized row order, computed in fp16 (default, as the original) or fp32."""
    if dtype not in (torch.float16, torch.float32):
        raise ValueError(f"EXL2 dequantisation precision must be float16 or float32, got {dtype}")
    codes = exl2_codes(e)
    zero = (1 << (e.layout.row_bits - 1)).to(codes.device).unsqueeze(1)
    scales = exl2_scales(e, dtype).to(torch.float32)[e.layout.row_group.to(codes.device)]
    w = (codes - zero).to(torch.float32) * scales
    return w.to(dtype)


def exl2_dequantize(tensors: dict[str, torch.Tensor] | Exl2Tensors, key: str = "", dtype: torch.dtype = torch.float16,
                    in_features: int | None = None, out_features: int | None = None) -> torch.Tensor:
    """Reference dequantiser: the (out, in) matrix W with y = x @ W.T, unpadded to out.

    dtype float16 (default) is bit-exact with the original's reconstruct kernel; float32 skips the two fp16 roundings.
    """
    e = tensors if isinstance(tensors, Exl2Tensors) else read_exl2(tensors, key, in_features, out_features)
    wq = exl2_dequantize_quantized_order(e, dtype)
    w = torch.empty_like(wq).index_copy_(0, e.q_perm.to(wq.device, torch.int64), wq)  # W[q_perm[k]] = Wq[k]
    return w[:, :e.out_features].t().contiguous()


def exl2_pack(codes: torch.Tensor, groups: Sequence[tuple[int, int]], scale_codes: torch.Tensor,
              scale_max: torch.Tensor, perm: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Writer: build the on-disk EXL2 tensors.

    codes: (in, out) unsigned codes, rows in quantized order (row k is input feature perm[k]).
    groups: [(bits, rows), ...] covering the rows in order, widths descending.
    scale_codes: (groups, out) in [0, 16) (the stored code is qscale - 1); scale_max: (groups,).
    Columns are padded to a multiple of 32 with the zero point 2^(b-1) and scale code 0.
    """
    n_in, out = codes.shape
    bits = torch.tensor([g[0] for g in groups], dtype=torch.int64)
    rows = torch.tensor([g[1] for g in groups], dtype=torch.int64)
    if int(rows.sum()) != n_in:
        raise ValueError(f"exl2_pack: groups cover {int(rows.sum())} rows, codes have {n_in}")
    if tuple(scale_codes.shape) != (len(groups), out) or tuple(scale_max.shape) != (len(groups),):
        raise ValueError("exl2_pack: scale_codes must be (groups, out) and scale_max (groups,)")
    if any(b not in EXL2_WIDTHS for b in bits.tolist()) or (bits[1:] > bits[:-1]).any():
        raise ValueError(f"exl2_pack: widths must be EXL2 widths in descending order, got {bits.tolist()}")
    out_pad = -(-out // 32) * 32
    qrows = (rows * bits + 31) // 32
    starts = torch.cumsum(qrows, 0) - qrows
    row_group = torch.repeat_interleave(torch.arange(len(groups)), rows)
    row_bits = bits[row_group]
    within = torch.arange(n_in) - (torch.cumsum(rows, 0) - rows)[row_group]
    bit_offset = starts[row_group] * 32 + within * row_bits
    padded = torch.empty((n_in, out_pad), dtype=torch.int64)
    padded[:, :out] = codes.to(torch.int64)
    padded[:, out:] = (1 << (row_bits - 1)).unsqueeze(1)
    q_weight = pack_bitstream(padded, bit_offset, row_bits, int(qrows.sum()))
    sc = torch.zeros((len(groups), out_pad), dtype=torch.int64)
    sc[:, :out] = scale_codes.to(torch.int64)
    perm = torch.arange(n_in) if perm is None else perm.to(torch.int64)
    result = {
        "q_weight": q_weight,
        "q_invperm": torch.argsort(perm).to(torch.int32),
        "q_scale": pack_nibble_columns(sc),
        "q_scale_max": scale_max.to(torch.float16),
        "q_groups": torch.stack([bits, starts], 1).reshape(-1).to(torch.int16),
    }
    if bias is not None:
        result["bias"] = bias.to(torch.float16)
    return result


def exl2_bits_per_weight(e: Exl2Tensors) -> float:
    """Stored bits per weight as the original counts them: q_weight + q_scale + q_scale_max + q_groups + q_invperm."""
    total = (e.q_weight.numel() * 32 + e.q_scale.numel() * 32 + e.q_scale_max.numel() * 16
             + e.layout.num_groups * 2 * 16 + e.in_features * 32)
    return total / (e.in_features * e.out_features)
