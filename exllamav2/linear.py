"""ExLlamaV2Linear: y = x @ W.T (+ b), with W dense (model dtype) or quantized (EXL2, GPTQ, GGUF blocks), an output
prescale, optional rows of a fused tensor, and LoRA adapters. The matmul is a kernel prepared once per activation
dtype by the first backend that accepts the weight (exllamav2/ops); fused_linear.py runs several linears as one."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ops
from .module import ExLlamaV2Module, MissingTensorError, TensorShapeError
from .ops import dispatch


class ExLlamaV2Linear(ExLlamaV2Module):
    # counts kernels prepared or dropped by any linear: a cache of kernels (moe_mlp.py's expert tables) is current
    # while it stands still
    kernel_epoch = 0
    name = "Linear"
    per_position = True

    def __init__(self, model, key, in_features: int, out_features: int, has_bias: bool, pad32: bool = True,
                 max_out_len=None, prescale: float = 1, f_key=None, f_beg=None, f_end=None,
                 is_sub_module: bool = True, altpack_qkv: bool = False, normalize_unq: bool = False,
                 archparams=None, maybe_transpose: bool = False, fused_rows: int | None = None):
        super().__init__(model, key, archparams)
        self.in_features = in_features
        self.out_features = out_features
        self.padding = 0  # dense outputs are never padded here; quantized formats handle their own padding
        self.has_bias = has_bias
        self.max_out_len = max_out_len
        self.prescale = prescale
        self.f_key, self.f_beg, self.f_end = f_key, f_beg, f_end
        self.fused_rows = fused_rows
        self.is_sub_module = is_sub_module
        self.altpack_qkv = altpack_qkv
        self.normalize_unq = normalize_unq
        self._weight = self._bias = self._q_handle = None
        self._kernels: dict = {}
        self._kernel_gen = -1
        self.fused_in: list = []   # FusedLinear groups this linear is a part of (they run it instead)
        self.lora_a_tensors: dict = {}
        self.lora_b_tensors: dict = {}
        self.assumed_footprint = in_features * out_features * 2 + 128

    # ------------------------------------------------------------------ weights (setting one drops the kernels)

    @property
    def weight(self):
        return self._weight

    @weight.setter
    def weight(self, w):
        self._weight = w
        self.weights_changed()

    @property
    def bias(self):
        return self._bias

    @bias.setter
    def bias(self, b):
        self._bias = b
        self.weights_changed()

    @property
    def q_handle(self):
        """The QuantWeight (EXL2, GPTQ or GGUF blocks) when the weight is quantized, else None."""
        return self._q_handle

    @q_handle.setter
    def q_handle(self, q):
        self._q_handle = q
        self.weights_changed()

    def weights_changed(self) -> None:
        self._kernels = {}
        ExLlamaV2Linear.kernel_epoch += 1
        for group in self.fused_in:
            group.invalidate()

    # ------------------------------------------------------------------ loading

    def load(self, w=None, device_context: bool = True, unmap: bool = False, output_map=None):
        if w is None and self.f_key is not None:
            w = self.load_weight_fused(self.f_key, self.f_beg, self.f_end, self.in_features, self.out_features,
                                       self.altpack_qkv)
        if w is None:
            w = self._gguf_blocks()
        if w is None:
            w = self.load_weight()
        if w is None:
            names = " or ".join(f"'{k}.weight'" for k in (self.f_key, self.key, self.alt_key) if k)
            raise MissingTensorError(f"{names}: tensor not found in the model files")
        if isinstance(w, dict):
            from .quant import make_quant_weight
            self.q_handle = make_quant_weight(self.key, w, self.in_features, self.out_features, self.dtype,
                                              self.device(), checkpoint_offset_qzeros=self.config.checkpoint_offset_qzeros,
                                              fast_path=False)
            self._check_bias(self.q_handle.has_bias() if hasattr(self.q_handle, "has_bias") else "bias" in w)
        elif hasattr(w, "packed_matrix"):
            self.q_handle = w
            self._check_bias(w.bias is not None)
        else:
            self._load_dense(w)
        if not self.fused_in:
            self.kernel(self.dtype)  # prepared once, at load (a fused group prepares its own)

    def _load_dense(self, w):
        weight, bias = w if isinstance(w, tuple) else (w, None)
        if (not self.is_sub_module and weight.dim() == 2 and weight.shape[0] > self.out_features
                and weight.shape[1] == self.in_features):
            # a head tied to an embedding padded past vocab_size: the extra rows are never produced
            weight = torch.nn.Parameter(weight[:self.out_features].contiguous(), requires_grad=False)
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise TensorShapeError(f"{self.key}.weight: shape {list(weight.shape)}, expected "
                                   f"[{self.out_features}, {self.in_features}]")
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise TensorShapeError(f"{self.key}.bias: shape {list(bias.shape)}, expected [{self.out_features}]")
        self._check_bias(bias is not None)
        if self.normalize_unq:
            weight = torch.nn.Parameter(F.normalize(weight.float(), dim=1).to(weight.dtype), requires_grad=False)
        self._weight, self._bias = weight, bias
        self.weights_changed()

    def _gguf_blocks(self):
        """A GgufWeight over this linear's GGUF quant blocks (kept packed), or None to load it dense."""
        if self.config.gguf_dequantize or self.f_key is not None or self.stored_transposed():
            return None
        from .quant.gguf import GgufWeight, gguf_block_type
        for key in (self.key, self.alt_key):
            if key is None or not self.has_tensor(key + ".weight"):
                continue
            src = self._source(key + ".weight")
            shape = tuple(src.shape(key + ".weight"))
            if gguf_block_type(src, key + ".weight", self.device()) is None or len(shape) != 2 or shape[1] != self.in_features \
                    or shape[0] < self.out_features:
                return None
            if shape[0] != self.out_features:
                return None  # a padded tied head: the dense path trims it
            bias = None
            if self.has_tensor(key + ".bias"):
                bias = self._float(self._source(key + ".bias").get_tensor(key + ".bias", device=self.device()))
            return GgufWeight(self.key, [(src, key + ".weight", self.out_features)], self.in_features,
                              self.out_features, self.dtype, self.device(), bias, fast_path=False)
        return None

    def _check_bias(self, present: bool):
        if self.has_bias and not present:
            raise MissingTensorError(f"{self.key}.bias: tensor not found, but the architecture/config expects a bias")
        if present and not self.has_bias:
            raise TensorShapeError(f"{self.key}.bias: unexpected bias tensor (the config says this layer has none)")

    def unload(self):
        self._weight = self._bias = self._q_handle = None
        self.weights_changed()

    def fused_footprint(self) -> int:
        if self.f_key is None:
            return 0
        total = 0
        for name in (self.f_key + ".weight", self.f_key + ".bias", self.f_key):
            src = self.config.tensor_file_map.get(name)
            if src is not None:
                shape = src.shape(name)
                rows = shape[1] if (self.archparams.orig_weights_transposed and len(shape) == 2) else shape[0]
                total += src.nbytes(name) * (self.f_end - self.f_beg) // rows
        return total

    def numel(self) -> int:
        return self.in_features * self.out_features

    def is_quant(self) -> bool:
        return self._q_handle is not None

    # ------------------------------------------------------------------ compute

    def kernel(self, dtype: torch.dtype):
        """The prepared matmul for activations of `dtype` (see exllamav2/ops)."""
        if self._kernel_gen != dispatch._generation:
            self._kernels, self._kernel_gen = {}, dispatch._generation
        k = self._kernels.get(dtype)
        if k is None:
            if self._weight is None and self._q_handle is None:
                raise RuntimeError(f"{self.key}: the layer is not loaded")
            dense = None if self._q_handle is not None else self._weight.data
            k = self._kernels[dtype] = ops.prepare_linear(dense, self._bias, self._q_handle, self.device(), dtype,
                                                          name=self.key)
            ExLlamaV2Linear.kernel_epoch += 1
        return k

    def cast_input(self, x: torch.Tensor) -> torch.Tensor:
        """x in the dtype this linear computes in: a dense weight's own; for a quantized one x's, except that fp32
        activations in a bf16/fp16 model take the model's dtype as a dense weight would. An fp32 residual stream
        (Gemma 2/3) hands its norms' fp32 outputs to q/k/v, gate/up and the head, where HF's bf16 model sees bf16;
        run in fp32 they took an fp32 dequantised copy of each weight (the CPU's GEMV keeps fp32 exact)."""
        if self._q_handle is None:
            return x if x.dtype == self._weight.dtype else x.to(self._weight.dtype)
        if x.dtype == torch.float32 and self.dtype != torch.float32:
            return x.to(self.dtype)
        return x

    def forward(self, hidden_states, cache=None, attn_params=None, past_len=None,
                intermediates=False, loras=None, force_recons=False, force_cuda=False, **kwargs):
        x = self.cast_input(hidden_states)
        k = self._kernels.get(x.dtype) if self._kernel_gen == dispatch._generation else None
        if k is None:
            k = self.kernel(x.dtype)
        y = k(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
        if loras or self.prescale != 1:
            y = self.finish(hidden_states, y, loras)
        return {"hidden_states": y} if intermediates else y

    def finish(self, x, y, loras):
        """The LoRA terms and the output prescale, on this linear's output `y` of input `x`."""
        if loras:
            for lora in loras:
                a = self.lora_a_tensors.get(lora)
                if a is not None:
                    y = y + (x.to(a.dtype) @ a) @ self.lora_b_tensors[lora]
        if self.prescale != 1:
            # the LoRA term sits inside the projection, so the output scale covers it too (as in HF/PEFT)
            y = y * self.prescale
        return y

    def get_weight(self) -> torch.Tensor:
        """The (out, in) weight in the model dtype, dequantized if needed."""
        if self._q_handle is not None:
            return self._q_handle.dequantize(self.dtype)
        return self._weight.data

    def get_weight_tensor_dq(self) -> torch.Tensor:
        """The (in, out) matrix, as the original returns it."""
        return self.get_weight().T

    def get_bias_tensor(self):
        if self._q_handle is not None:
            return self._q_handle.bias
        return self._bias.data if self._bias is not None else None

    def rank_reduce(self, k: float):
        if self._q_handle is not None:
            raise ValueError(f"{self.key}: rank_reduce works on unquantized weights only")
        w = self._weight.data.float()
        r = max(1, int(min(w.shape) * k))
        u, s, v = torch.svd_lowrank(w, q=r)
        self.weight = torch.nn.Parameter(((u * s) @ v.T).to(self._weight.dtype), requires_grad=False)
