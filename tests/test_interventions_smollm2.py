"""On the real SmolLM2-135M: a contrastive steering vector shifts a sentiment log-prob margin on held-out
prompts (scale 0 reproduces the unsteered logits exactly), activation patching moves the answer toward the clean
run, and capture works inside the streaming generator."""

from __future__ import annotations

import pytest
import torch

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
from exllamav2.interventions import (Replace, SteeringVectors, add_capture, add_edit, contrastive_steering,
                                     wrapped_slots)

POSITIVE = ["I love this, it is wonderful and", "What a great, happy day, I feel", "This is excellent, amazing and",
            "I am so glad and delighted that"]
NEGATIVE = ["I hate this, it is awful and", "What a terrible, sad day, I feel", "This is horrible, disgusting and",
            "I am so angry and upset that"]
HELD_OUT = ["The movie was", "My neighbour is", "Yesterday the weather was", "The food at the restaurant was"]
GOOD = [" good", " great", " happy", " wonderful", " love"]
BAD = [" bad", " terrible", " sad", " awful", " hate"]
LAYER = 15


@pytest.fixture(scope="module")
def smol(smollm2_gguf):
    from exllamav2.tokenizer import ExLlamaV2Tokenizer
    cfg = ExLlamaV2Config(smollm2_gguf)
    cfg.dtype = "float32"
    cfg.max_seq_len = 256
    model = ExLlamaV2(cfg)
    model.load()
    # one thread: on the shared, oversubscribed test machine two threads made each small matmul ~20x slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield model, ExLlamaV2Tokenizer(cfg)
    torch.set_num_threads(threads)


def word_ids(tok, words):
    ids = [tok.encode(w)[0] for w in words]
    assert all(len(i) == 1 for i in ids), "each word must be one token"
    return torch.stack(ids).flatten()


def margins(model, tok, prompts, good, bad):
    out = []
    for p in prompts:
        lp = model.forward(tok.encode(p), last_id_only=True)[0, -1].log_softmax(-1)
        out.append(lp[good].logsumexp(0) - lp[bad].logsumexp(0))
    return torch.stack(out)


def test_contrastive_steering_shifts_margin(smol, tmp_path):
    model, tok = smol
    sv = contrastive_steering(model, tok, POSITIVE, NEGATIVE, layers=[LAYER])
    path = str(tmp_path / "sentiment.safetensors")
    sv.save(path)
    sv = SteeringVectors.load(path)
    assert sv.layers == [LAYER] and sv.point == "resid_post" and "SmolLM2" in sv.model
    good, bad = word_ids(tok, GOOD), word_ids(tok, BAD)
    base = margins(model, tok, HELD_OUT, good, bad)
    with sv.register(model, scale=4.0):
        up = margins(model, tok, HELD_OUT, good, bad)
    with sv.register(model, scale=-4.0):
        down = margins(model, tok, HELD_OUT, good, bad)
    assert ((up - base) > 0.5).all(), f"positive steering: {base.tolist()} -> {up.tolist()}"
    assert ((base - down) > 0.5).all(), f"negative steering: {base.tolist()} -> {down.tolist()}"
    assert (up - base).mean() > 2.0 and (base - down).mean() > 1.0
    ids = tok.encode(HELD_OUT[0])
    ref = model.forward(ids)
    with sv.register(model, scale=0.0):
        assert torch.equal(model.forward(ids), ref), "scale 0 must reproduce the unsteered logits exactly"
    assert not wrapped_slots(model)


def test_activation_patching_moves_answer_toward_clean(smol):
    model, tok = smol
    clean, corrupt = tok.encode("The capital of France is the city of"), tok.encode("The capital of Italy is the city of")
    assert clean.shape == corrupt.shape
    diff = (clean != corrupt).nonzero()[:, 1].tolist()
    answer = tok.encode(" Paris")[0, 0]
    with add_capture(model, f"blocks.{LAYER}.resid_post") as cap:
        lp_clean = model.forward(clean)[0, -1].log_softmax(-1)[answer]
    lp_corrupt = model.forward(corrupt)[0, -1].log_softmax(-1)[answer]
    assert lp_clean > lp_corrupt + 1.0, "the prompts must disagree about the answer"
    stored = cap[f"blocks.{LAYER}.resid_post"].dense()[0]
    with add_edit(model, f"blocks.{LAYER}.resid_post", Replace(stored), positions=diff):
        lp_patched = model.forward(corrupt)[0, -1].log_softmax(-1)[answer]
    assert lp_patched > lp_corrupt + 0.5 * (lp_clean - lp_corrupt), (lp_clean, lp_corrupt, lp_patched)


def test_capture_and_steering_in_streaming_generator(smol):
    gen_mod = pytest.importorskip("exllamav2.generator.streaming")
    from exllamav2.generator.sampler import ExLlamaV2Sampler
    model, tok = smol
    gen = gen_mod.ExLlamaV2StreamingGenerator(model, ExLlamaV2Cache(model, max_seq_len=128), tok)
    ids = tok.encode("Once upon a time")

    def run(n):
        gen.begin_stream_ex(ids, ExLlamaV2Sampler.Settings.greedy(), max_new_tokens=n)
        toks = []
        while True:
            r = gen.stream_ex()
            toks += r["chunk_token_ids"].flatten().tolist()
            if r["eos"]:
                return toks

    with add_capture(model, ["blocks.3.resid_post", "final_norm"], positions="generated") as cap:
        toks = run(6)
    assert len(toks) == 6
    r = cap["final_norm"]
    # step k processes the token that yields new token k; the stream stops after the 6th
    assert r.steps.tolist() == list(range(len(r))) and len(r) >= 5
    assert r.positions.tolist() == list(range(ids.shape[1] - 1, ids.shape[1] - 1 + len(r)))
    head = model.modules[model.head_layer_idx]
    assert head.forward(r.values[:5]).float().argmax(-1).tolist() == toks[:5]
    v = cap["blocks.3.resid_post"].values.mean(0) * 3
    with add_edit(model, "blocks.3.resid_post", Replace(v), positions="generated", steps=[2]) as h:
        steered = run(6)
    assert steered[:2] == toks[:2]
    assert not wrapped_slots(model)
