"""The EXL2 conversion job (survey §5): tokenize -> measure -> optimize -> quantize -> compile, resumable from
its working folder. One module's weights are loaded at a time; hidden states of the calibration rows are kept
in fp32 between modules (and saved after each step, which is what makes resuming exact)."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..config import ExLlamaV2Config
from ..model import ExLlamaV2
from ..quant import exl2_pack, gptq_quantize
from ..quant.exl2 import exl2_bits_per_weight, read_exl2
from ..quant.gptq import gptq_bits_per_weight, read_gptq
from ..tokenizer import ExLlamaV2Tokenizer
from ..version import __version__
from .adaptive_gptq import (Exl2Quantized, PreparedHessian, ReferenceSolver, damp_for_target, output_errors,
                            prepare_hessian, quantize_options, reference_target, single_cpu_thread)
from .calibration import calibration_ids, read_calibration_text
from .compile import copy_model_files, plain_tensor, write_config, write_shards
from .job import Job, atomic_save_tensors, atomic_write_json, load_tensors
from .layers import (hessian_of, linear_stages, linear_weight, run_module, run_module_captures, run_module_paired,
                     substitute_weight)
from .optimize import Slot, achievable_bpw, max_drop_for, optimize
from .qparams import CANDIDATES, UNQUANTIZED, UNQUANTIZED_BITS, QuantOption, describe, head_option, is_unquantized
from .rotation import ROTATION_DIR, ROTATION_FILE, rotate_model_folder, rotation_unsupported
from .sensitivity import output_gradient_moments

SENSITIVITY_ROWS = 8
ROTATION_SEED = 0

StepCallback = Callable[[str, int], None]
# errors scored on the odd calibration rows, options fitted on the even ones (and weighted by loss sensitivity)
MEASURE_METHOD = "held-out-rows"


@dataclass
class ConvertSettings:
    in_dir: str
    out_dir: str
    bits: float = 4.0
    head_bits: int = 6
    calibration: str | None = None   # text file; None: the shipped default text
    rows: int = 16
    length: int = 512
    gptq: bool = False               # plain GPTQ 4-bit g128 act-order for the decoder layers instead of EXL2
    work_dir: str | None = None      # default: <out_dir>/.convert_job
    batch_rows: int = 4              # calibration rows per forward
    shard_mb: int = 8192
    measurement: str | None = None   # a measurement.json to reuse (skips measuring)
    save_measurement: str | None = None
    sensitivity: bool = True         # weight measured errors by the loss's output gradients (loads the whole model once)
    damp: float | None = None        # GPTQ damping (a fraction of mean(diag H)); None: by the target bpw
    fp_target: bool = True           # aim each quantized layer at the unquantized model's outputs (reference_target)
    rotate: bool = False             # rotate the residual stream first (rotation.py; RMSNorm pre-norm models only)
    max_drop: float | None = None    # no linear more than this below the target bpw; None: optimize.max_drop_for

    def job_settings(self) -> dict:
        """What must match for a working folder to be resumed."""
        d = asdict(self)
        for k in ("out_dir", "work_dir", "batch_rows", "shard_mb", "save_measurement"):
            d.pop(k)
        for k in ("in_dir", "calibration", "measurement"):
            if d[k] is not None:
                d[k] = os.path.abspath(d[k])
        if d["max_drop"] is None:  # job folders from before the setting existed stay resumable
            d.pop("max_drop")
        d["measure_method"] = MEASURE_METHOD  # a folder measured by an older method is not resumed
        return d


class ConversionInterrupted(RuntimeError):
    pass


def _exl2_tensors(q: Exl2Quantized, bias: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return exl2_pack(q.codes, q.groups, q.scale_codes, q.scale_max, q.perm,
                     None if bias is None else bias.detach().float().cpu())


class Converter:
    def __init__(self, s: ConvertSettings, resume: bool = True, progress: bool = True,
                 on_step: StepCallback | None = None):
        if not os.path.isfile(os.path.join(s.in_dir, "config.json")):
            raise FileNotFoundError(f"{s.in_dir}: not an HF model folder (no config.json); convert a GGUF file to a "
                                    "folder first (`exllamav2 convert-gguf`)")
        head_option(s.head_bits)  # validates -hb
        if not 1.5 <= s.bits <= 16:
            raise ValueError(f"target bits must be between 1.5 and 16 bpw"
                             f" (above 8.08 some linears stay fp16), got {s.bits}")
        if s.max_drop is not None and not s.max_drop > 0:
            raise ValueError(f"max_drop (bpw below the target a linear may go) must be positive, got {s.max_drop}")
        if s.damp is not None and not 0 < s.damp <= 100:
            raise ValueError(f"damp (GPTQ damping, a fraction of the Hessian's mean diagonal) must be in (0, 100], "
                             f"got {s.damp}")
        self.s = s
        self.damp = s.damp if s.damp is not None else damp_for_target(s.bits)
        self.progress = progress
        self.on_step = on_step
        self.work_dir = s.work_dir or os.path.join(s.out_dir, ".convert_job")
        self.job = Job.open(self.work_dir, s.job_settings(), resume)
        self.rotate = self._rotation(ExLlamaV2Config(s.in_dir))
        cfg = ExLlamaV2Config(self._rotated_dir() if self.rotate else s.in_dir)
        cfg.dtype = torch.float32  # calibration forwards and Hessians in fp32
        cfg.max_seq_len = max(cfg.max_seq_len, s.length)
        cfg.max_input_len = s.length
        cfg.max_attention_size = max(cfg.max_attention_size, s.length ** 2)
        self.config = cfg
        self.model = ExLlamaV2(cfg)  # modules are built, nothing is loaded
        mods = self.model.modules
        self.embedding = mods[0]
        self.layers = mods[1:self.model.head_layer_idx - 1]
        self.final_norm = mods[self.model.head_layer_idx - 1]
        self.head = mods[self.model.head_layer_idx]
        self.stages = {m.key + f"#{i}": linear_stages(m) for i, m in enumerate(self.layers)}
        keys = self.model.archparams.keys
        self.tied = self.head.key != keys["lm_head"]
        self.head_out_key = keys["lm_head"]

    # ------------------------------------------------------------------ helpers

    def _rotated_dir(self) -> str:
        return os.path.join(self.work_dir, "rotated")

    def _rotation(self, source: ExLlamaV2Config) -> bool:
        """Whether to rotate; writes the rotated model into the working folder once (a resumed job reuses it)."""
        if not self.s.rotate:
            return False
        why = rotation_unsupported(source)
        if why is not None:
            raise ValueError(f"{self.s.in_dir}: --rotate is not possible for {source.architecture}: {why}")
        if not self.job.get("rotated"):
            Q = rotate_model_folder(source, self._rotated_dir(), ROTATION_SEED, self.progress)
            atomic_save_tensors({"rotation": Q}, self.job.file(ROTATION_DIR, ROTATION_FILE))
            self.job.update(rotated=True)
        return True

    def _step_done(self, stage: str, index: int) -> None:
        if self.on_step is not None:
            self.on_step(stage, index)

    def _bar(self, total: int, initial: int, desc: str):
        return tqdm(total=total, initial=initial, desc=desc, unit="module", disable=not self.progress)

    def _states(self, name: str) -> torch.Tensor:
        return load_tensors(self.job.file(name))["hidden_states"]

    def _save_states(self, name: str, states: torch.Tensor) -> None:
        atomic_save_tensors({"hidden_states": states}, self.job.file(name))

    def _drop(self, name: str | None) -> None:
        if name is not None and os.path.exists(self.job.file(name)):
            os.remove(self.job.file(name))

    def _embed(self, name: str) -> None:
        ids = load_tensors(self.job.file("cal_ids.safetensors"))["ids"]
        self.embedding.load()
        try:
            states = torch.cat([self.embedding.forward(ids[a:a + self.s.batch_rows].to(self.embedding.device())).float().cpu()
                                for a in range(0, ids.shape[0], self.s.batch_rows)])
        finally:
            self.embedding.unload()
        self._save_states(name, states)

    def _embed_for_quant(self) -> None:
        self._embed("quant_states_0.safetensors")
        if self.s.fp_target:  # the unquantized model's states start out the same
            shutil.copyfile(self.job.file("quant_states_0.safetensors"), self.job.file("ref_states_0.safetensors"))

    # ------------------------------------------------------------------ stages

    def run(self) -> dict:
        job = self.job
        if job.stage == "begin":
            tok = ExLlamaV2Tokenizer(self.config)
            text, dataset = read_calibration_text(self.s.calibration)
            ids = calibration_ids(tok, text, self.s.rows, self.s.length)
            atomic_save_tensors({"ids": ids}, job.file("cal_ids.safetensors"))
            job.update(stage="embed", dataset=dataset)
        if job.stage == "embed":
            if self.s.gptq:
                self._embed_for_quant()
                job.update(stage="quant", quant_done=0)
            elif self.s.measurement is not None:
                with open(self.s.measurement) as f:
                    job.update(stage="optimize", measurement=json.load(f)["measurement"])
            else:
                self._embed("measure_states_0.safetensors")
                job.update(stage="measure", measure_done=0, measurement={})
        if job.stage == "measure":
            self._measure()
            if self.s.save_measurement:
                atomic_write_json({"measurement": job.get("measurement")}, self.s.save_measurement)
            job.update(stage="optimize")
        if job.stage == "optimize":
            strategy = self._optimize()
            self._embed_for_quant()
            job.update(stage="quant", strategy=strategy, quant_done=0)
        if job.stage == "quant":
            self._quantize()
            job.update(stage="compile")
        if job.stage == "compile":
            summary = self._compile()
            job.update(stage="finished", summary=summary)
        return job.get("summary")

    def _measure(self) -> None:
        job = self.job
        done = job.get("measure_done")
        measurement = job.get("measurement")
        grads = self._sensitivity() if self.s.sensitivity else None
        with self._bar(len(self.layers), done, "Measuring") as bar:
            for i in range(done, len(self.layers)):
                module = self.layers[i]
                states = self._states(f"measure_states_{i}.safetensors")
                module.load()
                held_out = states.shape[0] >= 2
                tokens = (states.shape[0] // 2 if held_out else states.shape[0]) * states.shape[1]
                try:
                    stages = linear_stages(module)
                    # nothing is substituted while measuring, so one pass gives every stage's Hessians
                    nxt, Hs = run_module(module, states, self.s.batch_rows, [c for c, _ in stages], split=held_out)
                    for capture, linears in stages:
                        H = Hs.pop(capture)
                        # Options are fitted on the even calibration rows and scored on the odd ones: GPTQ's
                        # in-sample error understates its error on other text by 20-60% (SmolLM2-135M, 6 bits),
                        # unevenly across projections, which misleads the bit allocation.
                        prep = prepare_hessian(H[0] if held_out else H, self.damp)
                        prep_val = prepare_hessian(H[1]) if held_out else None  # scoring uses its undamped H
                        for lin in linears:
                            W = linear_weight(lin)
                            res = quantize_options(W, prep, list(CANDIDATES))
                            weights = grads.get(lin.key) if grads is not None else None
                            if prep_val is None and weights is None:
                                errs = [r.error for r in res]
                            else:
                                errs = output_errors(W, prep_val or prep, [r.dequant for r in res], weights, tokens)
                            measurement[lin.key] = {
                                "numel": lin.numel(),
                                "options": [{"option": o.to_dict(), "total_bits": o.total_bits(lin.in_features, lin.out_features),
                                             "error": e} for o, e in zip(CANDIDATES, errs)],
                            }
                finally:
                    module.unload()
                self._save_states(f"measure_states_{i + 1}.safetensors", nxt)
                job.update(measure_done=i + 1, measurement=measurement)
                self._drop(f"measure_states_{i}.safetensors")
                bar.update(1)
                self._step_done("measure", i)
        self._drop(f"measure_states_{len(self.layers)}.safetensors")

    def _sensitivity(self) -> dict[str, torch.Tensor]:
        """Per-linear loss sensitivity (see sensitivity.py), computed once with the whole unquantized model loaded
        and kept in the working folder."""
        path = self.job.file("sensitivity.safetensors")
        if not os.path.isfile(path):
            ids = load_tensors(self.job.file("cal_ids.safetensors"))["ids"]
            rows = ids[torch.linspace(0, ids.shape[0] - 1, min(ids.shape[0], SENSITIVITY_ROWS)).round().long().unique()]
            linears = [lin for st in self.stages.values() for _, ls in st for lin in ls]
            self.model.load()
            try:
                grads = output_gradient_moments(self.model, linears, rows, self.progress)
            finally:
                self.model.unload()
            atomic_save_tensors(grads, path)
        return load_tensors(path)

    def _optimize(self) -> dict:
        measurement = self.job.get("measurement")
        keys = [lin.key for st in self.stages.values() for _, ls in st for lin in ls]
        missing = [k for k in keys if k not in measurement]
        if missing:
            raise ValueError(f"measurement has no entry for {missing[0]} (and {len(missing) - 1} more); it was made for another model")
        # every linear may also stay fp16: error 0, 16 bits a weight (the bias is not counted, as for EXL2 options)
        options = {k: measurement[k]["options"] + [{"option": UNQUANTIZED, "error": 0.0,
                                                     "total_bits": UNQUANTIZED_BITS * measurement[k]["numel"]}]
                   for k in keys}
        slots = [Slot(k, measurement[k]["numel"], tuple(o["total_bits"] for o in options[k]),
                      tuple(o["error"] for o in options[k])) for k in keys]
        max_drop = self.s.max_drop if self.s.max_drop is not None else max_drop_for(self.s.bits, self.rotate)
        choice = optimize(slots, self.s.bits, max_drop)
        numel = sum(s.numel for s in slots)
        bpw = sum(s.bits[j] for s, j in zip(slots, choice)) / numel
        if abs(bpw - self.s.bits) > 0.05:
            lo, hi = achievable_bpw(slots)
            print(f" -- warning: planned {bpw:.3f} bpw for a target of {self.s.bits} (achievable range {lo:.3f}-{hi:.3f})")
        return {k: {"option": options[k][j]["option"], "error": options[k][j]["error"]} for k, j in zip(keys, choice)}

    def _quantize_linear(self, lin, H: torch.Tensor, solver: ReferenceSolver | None,
                         prep: PreparedHessian | None) -> dict[str, torch.Tensor]:
        W = linear_weight(lin)
        if solver is not None:
            W = solver.target(W)
        bias = lin.bias.data if lin.bias is not None else None
        if self.s.gptq:
            with single_cpu_thread(W.device):
                t = gptq_quantize(W.cpu(), 4, 128, act_order=True, hessian=H.cpu())
            if bias is not None:
                t["bias"] = bias.to(torch.float16).cpu()
            t = {k: v.cpu() for k, v in t.items()}
            from ..quant import gptq_dequantize
            substitute_weight(lin, gptq_dequantize(t, "", torch.float16, lin.in_features, lin.out_features).float())
            return t
        chosen = self.job.get("strategy")[lin.key]["option"]
        if is_unquantized(chosen):
            w16 = W.to(torch.float16).cpu()
            substitute_weight(lin, w16.float())
            return {"weight": w16, **({"bias": bias.to(torch.float16).cpu()} if bias is not None else {})}
        option = QuantOption.from_dict(chosen)
        q = quantize_options(W, prep, [option])[0]
        t = _exl2_tensors(q, bias)
        check = read_exl2(t, lin.key, lin.in_features, lin.out_features)
        from ..quant import exl2_dequantize
        dq = exl2_dequantize(check, lin.key, torch.float16).float()
        if not torch.equal(dq, q.dequant.cpu()):  # the packed tensors must reconstruct what GPTQ fed back
            raise RuntimeError(f"{lin.key}: packed EXL2 tensors do not reconstruct the quantized weight")
        substitute_weight(lin, q.dequant)
        return t

    def _quantize(self) -> None:
        job = self.job
        done = job.get("quant_done")
        total = len(self.layers) + 1
        with self._bar(total, done, "Quantizing") as bar:
            for i in range(done, len(self.layers)):
                module = self.layers[i]
                states = self._states(f"quant_states_{i}.safetensors")
                ref = self._states(f"ref_states_{i}.safetensors") if self.s.fp_target else None
                module.load()
                tensors: dict[str, torch.Tensor] = {}
                try:
                    stages = linear_stages(module)
                    nxt_ref = ref_captured = None
                    if ref is not None:  # the unquantized module's pass, once: its output and every stage's input
                        nxt_ref, ref_captured = run_module_captures(module, ref, self.s.batch_rows,
                                                                    [c for c, _ in stages])
                    for capture, linears in stages:
                        if ref is None:
                            _, H = run_module(module, states, self.s.batch_rows, capture, keep_output=False)
                            solver = None
                        else:
                            H, C = run_module_paired(module, states, None, None, self.s.batch_rows, capture,
                                                     ref_captured=ref_captured.pop(capture))
                            solver = ReferenceSolver(H, C, self.damp)
                            del C
                        # one inverse-Hessian factor for every linear of the stage (they read the same input)
                        prep = None if self.s.gptq else prepare_hessian(H, self.damp)
                        for lin in linears:
                            for name, t in self._quantize_linear(lin, H, solver, prep).items():
                                tensors[f"{lin.key}.{name}"] = t
                    nxt, _ = run_module(module, states, self.s.batch_rows)
                finally:
                    module.unload()
                atomic_save_tensors(tensors, job.file("out_tensor", f"{i:04d}.safetensors"))
                self._save_states(f"quant_states_{i + 1}.safetensors", nxt)
                if nxt_ref is not None:
                    self._save_states(f"ref_states_{i + 1}.safetensors", nxt_ref)
                job.update(quant_done=i + 1)
                self._drop(f"quant_states_{i}.safetensors")
                self._drop(f"ref_states_{i}.safetensors")
                bar.update(1)
                self._step_done("quant", i)
            if done <= len(self.layers):
                self._quantize_head()
                job.update(quant_done=len(self.layers) + 1)
                bar.update(1)
                self._step_done("quant", len(self.layers))

    def _quantize_head(self) -> None:
        n = len(self.layers)
        states = self._states(f"quant_states_{n}.safetensors")
        ref = self._states(f"ref_states_{n}.safetensors") if self.s.fp_target else None
        self.final_norm.load()
        try:
            normed, _ = run_module(self.final_norm, states, self.s.batch_rows)
            ref_normed = run_module(self.final_norm, ref, self.s.batch_rows)[0] if ref is not None else None
        finally:
            self.final_norm.unload()
        head = self.head
        head.load()
        try:
            W = linear_weight(head)
            if ref_normed is None:
                H = hessian_of(normed, self.s.batch_rows, W.device)
            else:
                H, C = hessian_of(normed, self.s.batch_rows, W.device, ref_normed)
                W = reference_target(W, H, C, self.damp)
            bias = head.bias.data if head.bias is not None else None
            q = quantize_options(W, prepare_hessian(H, self.damp), [head_option(self.s.head_bits)])[0]
            t = _exl2_tensors(q, bias)
        finally:
            head.unload()
        atomic_save_tensors({f"{self.head_out_key}.{k}": v for k, v in t.items()},
                            self.job.file("out_tensor", "head.safetensors"))
        self._drop(f"quant_states_{n}.safetensors")
        self._drop(f"ref_states_{n}.safetensors")

    def _compile(self) -> dict:
        s = self.s
        os.makedirs(s.out_dir, exist_ok=True)
        quantized: dict[str, torch.Tensor] = {}
        for i in range(len(self.layers)):
            quantized.update(load_tensors(self.job.file("out_tensor", f"{i:04d}.safetensors")))
        head = load_tensors(self.job.file("out_tensor", "head.safetensors"))

        consumed = set()
        for st in self.stages.values():
            for _, linears in st:
                for lin in linears:
                    consumed |= {lin.key + ".weight", lin.key + ".bias"}
        if not self.tied:
            consumed |= {self.head.key + ".weight", self.head.key + ".bias"}
        tensors: dict[str, torch.Tensor] = {}
        fmap = self.config.tensor_file_map
        for name in fmap:  # embedding, norms and anything else the linears do not consume, in file order
            if name not in consumed:
                tensors[name] = plain_tensor(fmap[name].get_tensor(name, device="cpu"))
        tensors.update(quantized)
        tensors.update(head)
        files = write_shards(tensors, s.out_dir, s.shard_mb)

        decoder_bits, decoder_numel, per_layer = 0.0, 0, {}
        for st in self.stages.values():
            for _, linears in st:
                for lin in linears:
                    sub = {k[len(lin.key) + 1:]: v for k, v in quantized.items() if k.startswith(lin.key + ".")}
                    if "weight" in sub:  # left unquantized
                        bpw = sub["weight"].element_size() * 8
                    elif s.gptq:
                        bpw = gptq_bits_per_weight(read_gptq(sub, lin.key, lin.in_features, lin.out_features))
                    else:
                        bpw = exl2_bits_per_weight(read_exl2(sub, lin.key, lin.in_features, lin.out_features))
                    per_layer[lin.key] = round(bpw, 4)
                    decoder_bits += bpw * lin.numel()
                    decoder_numel += lin.numel()
        head_sub = {k[len(self.head_out_key) + 1:]: v for k, v in head.items()}
        head_bpw = exl2_bits_per_weight(read_exl2(head_sub, self.head_out_key, self.head.in_features, self.head.out_features))
        bpw = decoder_bits / decoder_numel

        copy_model_files(s.in_dir, s.out_dir)
        rotation = None
        if self.rotate:  # the matrix, so residual-stream vectors of the original model can be mapped (v @ Q)
            os.makedirs(os.path.join(s.out_dir, ROTATION_DIR), exist_ok=True)
            shutil.copyfile(self.job.file(ROTATION_DIR, ROTATION_FILE), os.path.join(s.out_dir, ROTATION_DIR, ROTATION_FILE))
            rotation = {"method": "random orthogonal", "seed": ROTATION_SEED,
                        "file": f"{ROTATION_DIR}/{ROTATION_FILE}"}
        if s.gptq:
            qc = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True, "sym": True,
                  "checkpoint_format": "gptq", "head": {"quant_method": "exl2", "bits": s.head_bits}}
        else:
            qc = {"quant_method": "exl2", "version": __version__, "bits": s.bits, "head_bits": s.head_bits,
                  "calibration": {"rows": s.rows, "length": s.length, "dataset": self.job.get("dataset")}}
        if rotation is not None:
            qc["residual_rotation"] = rotation
        write_config(s.in_dir, s.out_dir, qc, untie_head=self.tied or self.rotate)
        summary = {"files": files, "bpw": bpw, "head_bpw": head_bpw, "layers": per_layer}
        if not s.gptq:
            summary["strategy"] = {k: describe(v["option"]) for k, v in self.job.get("strategy").items()}
        return summary


def convert_exl2(settings: ConvertSettings, resume: bool = True, progress: bool = True,
                 on_step: StepCallback | None = None, keep_work: bool = False) -> dict:
    """Run (or resume) a conversion job; returns its summary {files, bpw, head_bpw, layers, strategy}.
    on_step(stage, index) is called after every finished module ("measure"/"quant"); raising in it interrupts the
    job, which the next call with the same settings and working folder resumes."""
    conv = Converter(settings, resume, progress, on_step)
    summary = conv.run()
    if not keep_work:
        shutil.rmtree(conv.work_dir, ignore_errors=True)
    return summary
