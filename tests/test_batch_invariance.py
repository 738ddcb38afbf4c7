"""The same greedy request gives the same tokens alone or among others in the dynamic generator (SmolLM2 in its
default weights: the GGUF's packed blocks, bf16 activations). Each sequence attends to exactly its own keys
(paged_attn.py) and the packed int4 kernel computes each row independently of the rows beside it."""

from __future__ import annotations

import pytest
import torch

from exllamav2 import ExLlamaV2Cache
from exllamav2.generator import ExLlamaV2Sampler
from exllamav2.generator.dynamic import ExLlamaV2DynamicGenerator, ExLlamaV2DynamicJob

PROMPTS = ["Write a haiku about the sea.", "What is 17 times 23?", "Name three prime numbers.",
           "Explain gravity to a child.", "Give me a recipe for pancakes."]


@pytest.fixture(scope="module")
def smol(smollm2_default):
    return smollm2_default


def run(model, tok, prompts, n=16):
    gen = ExLlamaV2DynamicGenerator(model, ExLlamaV2Cache(model, 1, 1024), tok, page_size=64)
    for i, p in enumerate(prompts):
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": p}]), encode_special_tokens=True)
        gen.enqueue(ExLlamaV2DynamicJob(ids, n, gen_settings=ExLlamaV2Sampler.Settings.greedy(), stop_conditions=[],
                                        identifier=i))
    out: dict = {}
    while gen.num_remaining_jobs():
        for r in gen.iterate():
            if r.get("stage") == "streaming":
                out.setdefault(r["identifier"], []).extend(r.get("token_ids", torch.empty(0)).flatten().tolist())
    return out


def test_greedy_tokens_alone_equal_tokens_in_a_crowd(smol):
    model, tok = smol
    together = run(model, tok, PROMPTS)
    for i, p in enumerate(PROMPTS):
        assert run(model, tok, [p])[0] == together[i], f"prompt {i} changed in a batch"
