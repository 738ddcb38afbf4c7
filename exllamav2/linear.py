"""ExLlamaV2Linear: y = x @ W.T (+ b), with W plain (model dtype) or quantized (EXL2/GPTQ via exllamav2.quant),
an output prescale, optional rows of a fused tensor, and LoRA adapters."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .module import ExLlamaV2Module, MissingTensorError, TensorShapeError


class ExLlamaV2Linear(ExLlamaV2Module):
    name = "Linear"

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
        self.weight = None
        self.bias = None
        self.q_handle = None  # QuantWeight when the weights are EXL2/GPTQ
        self.lora_a_tensors: dict = {}
        self.lora_b_tensors: dict = {}
        self.assumed_footprint = in_features * out_features * 2 + 128

    # ------------------------------------------------------------------ loading

    def load(self, w=None, device_context: bool = True, unmap: bool = False, output_map=None):
        if w is None and self.f_key is not None:
            w = self.load_weight_fused(self.f_key, self.f_beg, self.f_end, self.in_features, self.out_features,
                                       self.altpack_qkv)
        if w is None:
            w = self.load_weight()
        if w is None:
            names = " or ".join(f"'{k}.weight'" for k in (self.f_key, self.key, self.alt_key) if k)
            raise MissingTensorError(f"{names}: tensor not found in the model files")
        if isinstance(w, dict):
            from .quant import make_quant_weight
            self.q_handle = make_quant_weight(self.key, w, self.in_features, self.out_features, self.dtype,
                                              self.device(), checkpoint_offset_qzeros=self.config.checkpoint_offset_qzeros)
            self._check_bias(self.q_handle.has_bias() if hasattr(self.q_handle, "has_bias") else "bias" in w)
            return
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
        self.weight, self.bias = weight, bias

    def _check_bias(self, present: bool):
        if self.has_bias and not present:
            raise MissingTensorError(f"{self.key}.bias: tensor not found, but the architecture/config expects a bias")
        if present and not self.has_bias:
            raise TensorShapeError(f"{self.key}.bias: unexpected bias tensor (the config says this layer has none)")

    def unload(self):
        self.weight = self.bias = self.q_handle = None

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
        return self.q_handle is not None

    # ------------------------------------------------------------------ compute

    def forward(self, hidden_states, cache=None, attn_params=None, past_len=None,
                intermediates=False, loras=None, force_recons=False, force_cuda=False, **kwargs):
        x = hidden_states
        if self.q_handle is not None:
            y = self.q_handle.forward(x)
        else:
            y = F.linear(x.to(self.weight.dtype), self.weight, self.bias)
        if loras:
            for lora in loras:
                a = self.lora_a_tensors.get(lora)
                if a is not None:
                    y = y + (x.to(a.dtype) @ a) @ self.lora_b_tensors[lora]
        if self.prescale != 1:
            # the LoRA term sits inside the projection, so the output scale covers it too (as in HF/PEFT)
            y = y * self.prescale
        return {"hidden_states": y} if intermediates else y

    def get_weight(self) -> torch.Tensor:
        """The (out, in) weight in the model dtype, dequantized if needed."""
        if self.q_handle is not None:
            return self.q_handle.dequantize(self.dtype)
        return self.weight.data

    def get_weight_tensor_dq(self) -> torch.Tensor:
        """The (in, out) matrix, as the original returns it."""
        return self.get_weight().T

    def get_bias_tensor(self):
        return self.bias.data if self.bias is not None else None

    def rank_reduce(self, k: float):
        if self.q_handle is not None:
            raise ValueError(f"{self.key}: rank_reduce works on unquantized weights only")
        w = self.weight.data.float()
        r = max(1, int(min(w.shape) * k))
        u, s, v = torch.svd_lowrank(w, q=r)
        self.weight = torch.nn.Parameter(((u * s) @ v.T).to(self.weight.dtype), requires_grad=False)
