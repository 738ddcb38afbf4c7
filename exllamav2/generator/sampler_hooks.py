"""What a post-sampling hook receives. The generators call the hooks in Settings.post_sampling_hooks after
each sample, as the original's generators do (ExLlamaV2Sampler.sample itself does not call them)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class ExLlamaV2PostSamplingResult:
    sampled_token: torch.Tensor | None = None
    sampled_prob: torch.Tensor | None = None
    candidate_tokens: torch.Tensor | None = None
    candidate_probs: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    feed_filters: bool = True  # a hook may set this to False to keep the sampled token from the filters


ExLlamaV2PostSamplingHook = Callable[[ExLlamaV2PostSamplingResult], None]


def run_post_sampling_hooks(hooks: list[ExLlamaV2PostSamplingHook], result: ExLlamaV2PostSamplingResult):
    """Call each hook in order; hooks edit `result` in place."""
    for hook in hooks:
        hook(result)
    return result
