"""LoRA adapters (PEFT format): y += scaling * (x @ A.T) @ B.T on each targeted linear, applied per forward
for the adapters passed in `loras=[...]`, so several adapters can be switched per call without reloading."""

from __future__ import annotations

import json
import math
import os

import torch
from safetensors import safe_open

from .linear import ExLlamaV2Linear


class LoraError(ValueError):
    pass


class ExLlamaV2Lora:
    def __init__(self, model, lora_path: str, lora_scaling: float = 1.0):
        self.model = model
        self.lora_path = lora_path
        if model.config.residual_rotation:
            raise LoraError(f"{model.config.model_dir}: this model was converted with a rotated residual stream "
                            f"(quantization_config.residual_rotation), so LoRA adapters made for the original model "
                            f"do not apply to it ({lora_path}); convert it with --no-rotate to use LoRA")
        cfg_path = os.path.join(lora_path, "adapter_config.json")
        if not os.path.exists(cfg_path):
            raise FileNotFoundError(f"{lora_path}: no adapter_config.json in the LoRA folder")
        with open(cfg_path, encoding="utf8") as f:
            self.lora_config = json.load(f)
        c = self.lora_config
        if c.get("fan_in_fan_out"):
            raise LoraError(f"{cfg_path}: fan_in_fan_out adapters are not supported")
        self.lora_r = int(c["r"])
        alpha = float(c.get("lora_alpha", self.lora_r))
        if c.get("use_rslora"):
            self.lora_scaling = lora_scaling * alpha / math.sqrt(self.lora_r)
        else:
            self.lora_scaling = lora_scaling * alpha / self.lora_r
        self.target_modules: list[ExLlamaV2Linear] = []
        self._load_tensors()
        model.update_loras()

    @classmethod
    def from_directory(cls, model, directory: str, lora_scaling: float = 1.0) -> "ExLlamaV2Lora":
        return cls(model, directory, lora_scaling)

    def _tensor_file(self) -> str:
        st = os.path.join(self.lora_path, "adapter_model.safetensors")
        if os.path.exists(st):
            return st
        if os.path.exists(os.path.join(self.lora_path, "adapter_model.bin")):
            raise LoraError(f"{self.lora_path}: adapter_model.bin (pickle) is not loaded for safety; "
                            "convert it to adapter_model.safetensors")
        raise FileNotFoundError(f"{self.lora_path}: no adapter_model.safetensors")

    def _load_tensors(self) -> None:
        path = self._tensor_file()
        pairs: dict = {}
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                key = name
                for prefix in ("base_model.model.",):
                    if key.startswith(prefix):
                        key = key[len(prefix):]
                for part in (".lora_A.weight", ".lora_B.weight", ".lora_A.default.weight", ".lora_B.default.weight"):
                    if key.endswith(part):
                        target = key[: -len(part)]
                        pairs.setdefault(target, {})["A" if "lora_A" in part else "B"] = f.get_tensor(name)
                        break
                else:
                    if key.endswith(".bias"):
                        if torch.any(f.get_tensor(name) != 0):
                            raise LoraError(f"{path}: tensor '{name}': LoRA bias training is not supported")
                        continue
                    raise LoraError(f"{path}: tensor '{name}' is not a LoRA A/B matrix (full-weight replacements "
                                    "such as modules_to_save are not supported)")
        for target, ab in pairs.items():
            if "A" not in ab or "B" not in ab:
                raise LoraError(f"{path}: '{target}' has only lora_{'A' if 'A' in ab else 'B'}")
            self._attach(target, ab["A"], ab["B"], path)

    def _linears_for(self, target: str) -> list[tuple[ExLlamaV2Linear, int, int]]:
        """(linear, row_beg, row_end): the linear itself, or the projections sliced from a fused tensor."""
        out = []
        for m in _all_linears(self.model):
            if m.key == target:
                out.append((m, 0, m.out_features))
            elif m.f_key == target:
                out.append((m, m.f_beg, m.f_end))
        return out

    def _attach(self, target: str, a: torch.Tensor, b: torch.Tensor, path: str) -> None:
        linears = self._linears_for(target)
        if not linears:
            raise LoraError(f"{path}: LoRA target '{target}' matches no linear layer of this model")
        for lin, beg, end in linears:
            if a.shape[1] != lin.in_features or b.shape[1] != a.shape[0] or b.shape[0] < end:
                raise LoraError(f"{path}: LoRA '{target}' has A {list(a.shape)}, B {list(b.shape)}; the layer "
                                f"{lin.key} expects A [r, {lin.in_features}] and B [{end - beg if beg else lin.out_features}, r]")
            dev, dt = lin.device(), lin.dtype
            lin.lora_a_tensors[self] = a.T.contiguous().to(dev, dt)
            lin.lora_b_tensors[self] = (b[beg:end].T * self.lora_scaling).contiguous().to(dev, dt)
            self.target_modules.append(lin)

    def unload(self) -> None:
        for lin in self.target_modules:
            lin.lora_a_tensors.pop(self, None)
            lin.lora_b_tensors.pop(self, None)
        self.target_modules = []
        self.model.update_loras()

    def __hash__(self):
        return id(self)

    def __eq__(self, other):
        return self is other


def _all_linears(model):
    seen = set()
    stack = list(model.modules)
    while stack:
        m = stack.pop()
        inner = getattr(m, "inner", None)  # see through Intervention wrappers
        if inner is not None and not isinstance(m, ExLlamaV2Linear):
            stack.append(inner)
            continue
        if id(m) in seen:
            continue
        seen.add(id(m))
        if isinstance(m, ExLlamaV2Linear):
            yield m
        stack.extend(getattr(m, "submodules", []) or [])
