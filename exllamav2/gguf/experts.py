"""llama.cpp's stacked expert tensors (blk.N.ffn_gate_exps / ffn_up_exps / ffn_down_exps: all E experts of a block
in one 3-D tensor) seen as one 2-D tensor per expert, under the HF per-expert name: the family's block name has `*`
for the expert index (exllamav2/architectures/mixtral.py, qwen_moe.py). The 3-D tensor is E * R rows of quant
blocks; expert e is rows [e * R, (e + 1) * R), a view of the file's memory map, so a GgufWeight over it keeps the
file's blocks (exllamav2/quant/gguf.py) and a dense load dequantises that expert alone."""

import re

from .errors import GGUFError
from .tensors import GGUFTensor

EXPERT = "*"  # the expert index in a family's HF block name

# (rows, columns) of one expert, HF order, for llama.cpp's stacked tensors: "ffn" is the expert width
_STACKED = {"ffn_gate_exps": ("ffn", "hidden"), "ffn_up_exps": ("ffn", "hidden"), "ffn_down_exps": ("hidden", "ffn")}
_PART_RE = re.compile(r"^blk\.\d+\.([a-z0-9_]+)\.weight$")


class ExpertView:
    """One expert of a stacked tensor, read like a GGUFTensor (the attributes GGUFFile uses):
    `name` is the stacked tensor's, `shape` (innermost first, as GGUF lists it) and `data` are the expert's."""

    def __init__(self, tensor: GGUFTensor, expert: int, count: int):
        self.tensor, self.expert, self.count = tensor, expert, count
        self.name = tensor.name
        self.tensor_type = tensor.tensor_type
        self.shape = tensor.shape[:-1]
        self.n_bytes = int(tensor.n_bytes) // count

    @property
    def data(self):
        return self.tensor.data[self.expert]


def _check(path: str, arch: str, t: GGUFTensor, count: int, sizes: dict) -> None:
    shape = [int(d) for d in reversed(t.shape)]
    part = _PART_RE.match(t.name)
    dims = _STACKED.get(part.group(1)) if part else None
    expected = [count, *(sizes[d] for d in dims)] if dims and None not in sizes.values() else None
    if len(shape) != 3 or shape[0] != count or (expected is not None and shape != expected):
        want = expected or f"[{count}, rows, columns]"
        raise GGUFError(f"{path}: tensor '{t.name}' has shape {shape}, expected {want} (3-D, one matrix per expert: "
                        f"'{arch}.expert_count' = {count}, expert width {sizes['ffn']}, hidden size {sizes['hidden']})")


def split_experts(path: str, meta, tensors: dict[str, GGUFTensor]) -> dict:
    """{HF name: tensor} with every stacked expert tensor (its HF name holds `*`) replaced by one ExpertView per
    expert. The stacked tensors must be (expert_count, rows, columns), as the metadata (`meta`, see metadata.py
    GGUFMeta, its `arch` set) says: the expert width is expert_feed_forward_length, else feed_forward_length."""
    stacked = {k: t for k, t in tensors.items() if EXPERT in k}
    if not stacked:
        return tensors
    arch = meta.arch
    count = meta.uniform_int(f"{arch}.expert_count")
    if not count:
        name = next(iter(stacked.values())).name
        raise GGUFError(f"{path}: tensor '{name}' holds stacked experts but the required GGUF metadata field "
                        f"'{arch}.expert_count' is missing or 0")
    sizes = {"hidden": meta.uniform_int(f"{arch}.embedding_length"),
             "ffn": meta.uniform_int(f"{arch}.expert_feed_forward_length",
                                     meta.uniform_int(f"{arch}.feed_forward_length"))}
    out = {}
    for key, t in tensors.items():
        if key not in stacked:
            out[key] = t
            continue
        _check(path, arch, t, count, sizes)
        for e in range(count):
            out[key.replace(EXPERT, str(e))] = ExpertView(t, e, count)
    return out
