"""GGUFFile: a GGUF checkpoint seen as an HF model: HF config and HF-named, HF-layout tensors."""

import os

import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

from .errors import GGUFError
from .layout import unpermute_rotary_rows
from .experts import ExpertView, split_experts
from .header import GGUFHeader
from .metadata import GGUFMeta, architecture_spec, build_hf_config
from .names import block_part, map_tensor_names
from .tensors import GGUFTensor, read_gguf

_NATURAL_DTYPE = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}


class GGUFFile:
    """A memory-mapped GGUF file. Tensor data is read (and dequantised) only by get_tensor/raw."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"{self.path}: GGUF file not found")
        header, tensors = read_gguf(self.path)
        self._header: GGUFHeader = header
        fields = header.fields
        self.architecture, self._spec = architecture_spec(self.path, fields)
        # the file's own tensors by GGUF name (stacked experts still stacked)
        by_gguf_name: dict[str, GGUFTensor] = {t.name: t for t in tensors}
        self._gguf_tensors = by_gguf_name
        self._gguf_names = map_tensor_names(self.path, self._spec, list(by_gguf_name))
        rope_freqs = by_gguf_name.get("rope_freqs.weight")
        self._config = build_hf_config(self.path, fields, set(by_gguf_name),
                                       None if rope_freqs is None else dequantize(rope_freqs.data, rope_freqs.tensor_type))
        meta = GGUFMeta(self.path, fields, set(by_gguf_name))
        meta.arch = self.architecture
        # stacked expert tensors become one tensor per expert (a view of its rows)
        self._tensors: dict[str, GGUFTensor | ExpertView] = split_experts(
            self.path, meta, {hf: by_gguf_name[g] for hf, g in self._gguf_names.items()})
        self._one_row = {hf for hf, g in self._gguf_names.items() if block_part(g) in self._spec.one_row_matrices}

    def __repr__(self) -> str:
        return f"GGUFFile({self.path!r}, architecture={self.architecture!r}, tensors={len(self._tensors)})"

    def hf_config(self) -> dict:
        """The HF config.json dict for this model (a fresh copy)."""
        import copy
        return copy.deepcopy(self._config)

    def metadata(self, key: str, default=None):
        """A GGUF metadata field as Python values (e.g. 'general.name'), or `default` when absent."""
        field = self._header.fields.get(key)
        return default if field is None else field.contents()

    def all_metadata(self) -> dict:
        """Every metadata field as plain Python values (arrays as lists), from the header already read: what
        exllamav2/tokenizer/gguf_metadata.py's read_gguf_metadata reads from the file."""
        return self._header.metadata()

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def gguf_name(self, key: str) -> str:
        return self._tensor(key).name

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape in HF layout: GGUF lists dimensions innermost first, HF outermost first."""
        shape = tuple(int(d) for d in reversed(self._tensor(key).shape))
        return (1, *shape) if len(shape) == 1 and key in self._one_row else shape

    def dtype(self, key: str) -> torch.dtype:
        """The float type the tensor holds once dequantised (float32 for quantized types)."""
        return _NATURAL_DTYPE.get(self._tensor(key).tensor_type, torch.float32)

    def nbytes(self, key: str) -> int:
        """Bytes the tensor occupies in the file, as stored (quantized)."""
        return int(self._tensor(key).n_bytes)

    def ggml_type(self, key: str) -> str:
        return self._tensor(key).tensor_type.name

    def get_tensor(self, key: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor dequantised, in HF layout and conventions, as `dtype` (default: self.dtype(key))."""
        t = self._tensor(key)
        try:
            values = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise GGUFError(f"{self.path}: tensor '{t.name}': cannot dequantise {t.tensor_type.name} ({e})") from e
        except ValueError as e:  # gguf-py on a malformed tensor (a zero dimension, say): name the file and tensor
            raise GGUFError(f"{self.path}: tensor '{t.name}' ({t.tensor_type.name}, shape {list(self.shape(key))}) "
                            f"cannot be read: {e}") from e
        values = values.reshape(self.shape(key))
        values = self._to_hf_rows(key, values)
        if not values.flags.writeable:
            values = values.copy()
        tensor = torch.from_numpy(values)
        if self._spec.norm_offset and t.name.endswith("norm.weight"):
            tensor = tensor.float() - self._spec.norm_offset
        return tensor.to(device=device, dtype=dtype if dtype is not None else self.dtype(key))

    def raw(self, key: str) -> tuple[str, np.ndarray, tuple[int, ...]]:
        """(ggml type name, stored bytes as uint8 [rows, bytes per row], HF shape). Rows are in HF order
        (q/k permutation undone); values are as stored, so Gemma norms still carry llama.cpp's +1."""
        t = self._tensor(key)
        shape = self.shape(key)
        # Quant blocks run along the innermost dimension, so a quantized 1-D tensor is one row.
        rows = shape[0] if len(shape) > 1 or t.tensor_type in _NATURAL_DTYPE else 1
        data = np.asarray(t.data).view(np.uint8).reshape(rows, -1)
        return t.tensor_type.name, self._to_hf_rows(key, data), shape

    def _to_hf_rows(self, key: str, rows: np.ndarray) -> np.ndarray:
        if not self._spec.permuted_qk:
            return rows
        for part, heads_key in ((".self_attn.q_proj.", "num_attention_heads"), (".self_attn.k_proj.", "num_key_value_heads")):
            if part in key:
                try:
                    return unpermute_rotary_rows(rows, self._config[heads_key])
                except ValueError as e:  # rows that do not split into the metadata's heads
                    raise GGUFError(f"{self.path}: tensor '{self._tensor(key).name}': {e} ({heads_key} "
                                    f"{self._config[heads_key]} from the metadata)") from e
        return rows

    def _tensor(self, key: str) -> GGUFTensor | ExpertView:
        t = self._tensors.get(key)
        if t is None:
            raise KeyError(f"{self.path}: no tensor '{key}' (HF name) in this GGUF file")
        return t
