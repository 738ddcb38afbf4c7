"""The dynamic generator's plain sampled rows, sampled together on the logits' device (sampler_device.py).

A step's rows that need nothing from the host (no filters, no top-token lists, no CFG) are sampled in one call
with one transfer back; the others, and every position of a verified draft, take the host path
(ExLlamaV2Sampler.sample) in the generator as before. Each job draws its uniform from its own seeded
`random.Random` exactly as the host path does (one draw per sample), so a job samples the same tokens on either
path and whatever else shares its step.
"""
from __future__ import annotations

import torch

from .sampler_device import DeviceSamplingParams, device_sampling_supported, sample_on_device


def samples_on_device(job) -> bool:
    """Whether the job's plain steps can sample on the device."""
    return device_sampling_supported(job.gen_settings, filters=job.filters,
                                     return_top_tokens=job.return_top_tokens)


def sample_step_on_device(segments: list, drafts: dict, logits: torch.Tensor | None, tokenizer) -> dict:
    """
    {job: (token, probability)} for the step's plain sampled rows that can sample on the device.

    :param segments: the step's (job, tokens, wants logits) in the order of `logits`' rows
        (ExLlamaV2DynamicGenerator.iterate): a job that wants logits has one row, a verified job one per position
    :param drafts: {job: draft tokens}; those jobs are left to the host path
    :param logits: (rows, vocab) on the model's device
    """
    picks, row = [], 0
    for job, n, want in segments:
        if not want:
            continue
        if job in drafts:
            row += n
            continue
        if samples_on_device(job):
            picks.append((job, row))
        row += 1
    if not picks:
        return {}
    jobs = [job for job, _ in picks]
    settings = [job.gen_settings for job in jobs]
    params = DeviceSamplingParams.build(
        settings, logits.shape[-1], logits.device, tokenizer,
        histories=[job.sequence if job.needs_history() else None for job in jobs],
        blocked_tokens=[job.blocked_tokens() or None for job in jobs],
        mirostat_mu=[s.mirostat_mu[0] if s.mirostat and s.mirostat_mu else None for s in settings])
    uniforms = torch.tensor([job.rng.random() for job in jobs], dtype=torch.float32).to(logits.device,
                                                                                     non_blocking=True)
    rows = torch.tensor([r for _, r in picks], dtype=torch.long).to(logits.device, non_blocking=True)
    tokens, probs, mu, ok = sample_on_device(logits.index_select(0, rows), params, uniforms).to_host()
    for job, good in zip(jobs, ok):
        if not good:
            raise ValueError(f"ExLlamaV2DynamicGenerator: no token can be sampled for job {job.serial} "
                             "(all masked, or NaN logits)")
    for s, m in zip(settings, mu):
        if s.mirostat:
            s.mirostat_mu = [m]
    return {job: (t, p) for job, t, p in zip(jobs, tokens, probs)}
