"""The resumable job: job.json (settings, stage, measurement, strategy, progress) and the per-step files in the
working folder. Every file is written to a temporary name and renamed, and job.json is written last, so an
interrupted step leaves the previous state intact."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

JOB_FILE = "job.json"
JOB_VERSION = 1


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: str) -> None:
    tmp = path + ".tmp"
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: working file missing; the job folder is incomplete (start over with --no-resume)")
    return load_file(path)


def atomic_write_json(obj, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


class Job:
    def __init__(self, work_dir: str, settings: dict):
        self.dir = work_dir
        self.path = os.path.join(work_dir, JOB_FILE)
        self.state: dict = {"version": JOB_VERSION, "settings": settings, "stage": "begin"}

    @classmethod
    def open(cls, work_dir: str, settings: dict, resume: bool = True) -> "Job":
        os.makedirs(work_dir, exist_ok=True)
        job = cls(work_dir, settings)
        if resume and os.path.isfile(job.path):
            with open(job.path) as f:
                saved = json.load(f)
            if saved.get("settings") != settings:
                diff = sorted(k for k in set(settings) | set(saved.get("settings", {}))
                              if settings.get(k) != saved.get("settings", {}).get(k))
                raise ValueError(f"{job.path}: the working folder holds a job with different settings ({', '.join(diff)}); "
                                 "use another --work-dir or --no-resume")
            job.state = saved
        return job

    @property
    def stage(self) -> str:
        return self.state["stage"]

    def get(self, key, default=None):
        return self.state.get(key, default)

    def update(self, **fields) -> None:
        self.state.update(fields)
        atomic_write_json(self.state, self.path)

    def file(self, *parts: str) -> str:
        path = os.path.join(self.dir, *parts)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return path
