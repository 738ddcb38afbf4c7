"""Base and streaming generators on SmolLM2-135M (fp32): streamed text, stop strings and tokens, banned strings,
seeds, batches, cache reuse and the optional per-token outputs."""

from __future__ import annotations

import pytest
import torch

from exllamav2.cache import ExLlamaV2Cache
from exllamav2.config import ExLlamaV2Config
from exllamav2.generator import ExLlamaV2BaseGenerator, ExLlamaV2Sampler, ExLlamaV2StreamingGenerator
from exllamav2.generator.streaming import overlaps_start
from exllamav2.model import ExLlamaV2
from exllamav2.tokenizer import ExLlamaV2Tokenizer

PROMPT = "The lighthouse keeper wrote in his ledger every day. On Monday he wrote:"
N = 16


@pytest.fixture(scope="module")
def parts(smollm2_gguf):
    config = ExLlamaV2Config(smollm2_gguf)
    config.dtype = torch.float32
    config.max_seq_len = 256
    model = ExLlamaV2(config)
    model.load()
    tokenizer = ExLlamaV2Tokenizer(config)
    return model, tokenizer


@pytest.fixture(scope="module")
def streamer(parts):
    model, tokenizer = parts
    return ExLlamaV2StreamingGenerator(model, ExLlamaV2Cache(model, max_seq_len=256), tokenizer)


def run_stream(gen, ids, settings=None, stops=None, **kwargs) -> tuple[list[str], list[int], dict]:
    gen.set_stop_conditions(stops if stops is not None else [])
    gen.begin_stream_ex(ids, settings or ExLlamaV2Sampler.Settings.greedy(), **kwargs)
    chunks, tokens = [], []
    for _ in range(200):
        r = gen.stream_ex()
        chunks.append(r["chunk"])
        tokens += r["chunk_token_ids"][0].tolist()
        if r["eos"]:
            return chunks, tokens, r
    raise AssertionError("the stream never ended")


@pytest.fixture(scope="module")
def greedy(parts, streamer):
    """Reference greedy continuation of PROMPT: (prompt ids, token ids, text)."""
    _, tokenizer = parts
    ids = tokenizer.encode(PROMPT)
    chunks, tokens, last = run_stream(streamer, ids, max_new_tokens=N)
    assert last["eos_reason"] == "max_new_tokens" and len(tokens) == N
    return ids, tokens, "".join(chunks)


def test_chunks_concatenate_to_full_decode(parts, greedy):
    _, tokenizer = parts
    ids, tokens, text = greedy
    assert text == tokenizer.decode(torch.tensor(tokens))
    assert tokenizer.decode(torch.cat([ids[0], torch.tensor(tokens)])) == PROMPT + text


def test_base_generator_matches_streaming(parts, greedy):
    model, tokenizer = parts
    _, tokens, text = greedy
    gen = ExLlamaV2BaseGenerator(model, ExLlamaV2Cache(model, max_seq_len=256), tokenizer)
    out = gen.generate_simple(PROMPT, ExLlamaV2Sampler.Settings.greedy(), N, stop_token=None)
    assert out == PROMPT + text
    assert gen.sequence_ids[0, -N:].tolist() == tokens


def test_stop_string_split_across_tokens_is_caught_and_never_emitted(parts, streamer, greedy):
    _, tokenizer = parts
    ids, tokens, text = greedy
    pieces = [tokenizer.decode(torch.tensor(tokens[:i])) for i in range(len(tokens) + 1)]
    # a boundary between two tokens of >= 2 characters each, far enough in to hold text back for a while
    stop, at = None, None
    for i in range(3, len(tokens) - 1):
        left, right = pieces[i], pieces[i + 1]
        if len(left) - len(pieces[i - 1]) >= 2 and len(right) - len(left) >= 2:
            candidate = left[-2:] + right[len(left):len(left) + 2]
            if text.find(candidate) == len(left) - 2:
                stop, at = candidate, len(left) - 2
                break
    assert stop is not None, f"no token boundary to split a stop string over in {text!r}"
    chunks, _, last = run_stream(streamer, ids, stops=[stop], max_new_tokens=N)
    assert last["eos"] and last["eos_reason"] == "stop_string"
    assert "".join(chunks) == text[:at]
    assert stop not in "".join(chunks)
    # text that may begin the stop string is held back: no released prefix ends with a start of it
    released = ["".join(chunks[:k + 1]) for k in range(len(chunks) - 1)]
    assert not any(overlaps_start(r, stop) for r in released)


def test_stop_token_ends_stream_without_emitting_it(parts, streamer, greedy):
    _, tokenizer = parts
    ids, tokens, _ = greedy
    k = next(i for i in range(2, N) if tokens[i] not in tokens[:i])
    chunks, got, last = run_stream(streamer, ids, stops=[tokens[k]], max_new_tokens=N)
    assert last["eos_reason"] == "stop_token"
    assert got == tokens[:k]
    assert "".join(chunks) == tokenizer.decode(torch.tensor(tokens[:k]))


def test_max_new_tokens_attribute(parts, streamer, greedy):
    ids, tokens, _ = greedy
    streamer.max_new_tokens = 5
    try:
        _, got, last = run_stream(streamer, ids)
    finally:
        streamer.max_new_tokens = None
    assert last["eos_reason"] == "max_new_tokens" and got == tokens[:5]


def test_banned_string_is_rewound_and_avoided(parts, streamer, greedy):
    _, tokenizer = parts
    ids, tokens, text = greedy
    word = next(w for w in text.split() if len(w) >= 4 and w.isalpha())
    chunks, _, last = run_stream(streamer, ids, banned_strings=[word.upper()], max_new_tokens=N)
    out = "".join(chunks)
    assert word.lower() not in out.lower()
    assert out[:text.lower().find(word.lower())] == text[:text.lower().find(word.lower())]


def test_seeded_sampling_repeats(parts, streamer, greedy):
    model, tokenizer = parts
    ids = greedy[0]
    settings = ExLlamaV2Sampler.Settings(temperature=1.5, top_k=0, top_p=0.0, token_repetition_penalty=1.0)
    a = run_stream(streamer, ids, settings, max_new_tokens=10, seed=7)[1]
    b = run_stream(streamer, ids, settings, max_new_tokens=10, seed=7)[1]
    c = run_stream(streamer, ids, settings, max_new_tokens=10, seed=8)[1]
    assert a == b and a != c
    gen = ExLlamaV2BaseGenerator(model, ExLlamaV2Cache(model, max_seq_len=256), tokenizer)
    x = gen.generate_simple(PROMPT, settings, 10, seed=7, stop_token=None)
    y = gen.generate_simple(PROMPT, settings, 10, seed=7, stop_token=None)
    assert x == y


def test_batch_generate_simple_equals_single_prompts(parts, greedy):
    model, tokenizer = parts
    prompts = [PROMPT, "Water boils at"]
    gen = ExLlamaV2BaseGenerator(model, ExLlamaV2Cache(model, batch_size=2, max_seq_len=128), tokenizer)
    batch = gen.generate_simple(prompts, ExLlamaV2Sampler.Settings.greedy(), 10, stop_token=None)
    single_gen = ExLlamaV2BaseGenerator(model, ExLlamaV2Cache(model, max_seq_len=128), tokenizer)
    singles = [single_gen.generate_simple(p, ExLlamaV2Sampler.Settings.greedy(), 10, stop_token=None) for p in prompts]
    assert batch == singles
    assert batch[0] == PROMPT + tokenizer.decode(torch.tensor(greedy[1][:10]))


def test_generate_simple_stops_each_row_at_its_stop_token(parts, greedy):
    model, tokenizer = parts
    _, tokens, _ = greedy
    k = next(i for i in range(2, N) if tokens[i] not in tokens[:i])
    gen = ExLlamaV2BaseGenerator(model, ExLlamaV2Cache(model, max_seq_len=128), tokenizer)
    out = gen.generate_simple(PROMPT, ExLlamaV2Sampler.Settings.greedy(), N, stop_token=tokens[k],
                              completion_only=True)
    assert out == tokenizer.decode(torch.tensor(tokens[:k]))
    assert gen.sequence_ids.shape[-1] == greedy[0].shape[-1] + k + 1  # stopped right after the stop token


def test_cache_reuse_for_matching_prefix(parts, streamer, greedy):
    model, tokenizer = parts
    ids, tokens, _ = greedy
    run_stream(streamer, ids, max_new_tokens=4)
    longer = torch.cat([ids, torch.tensor([tokens[:6]])], dim=-1)
    processed = []
    forward = model.forward

    def counting_forward(input_ids, *args, **kwargs):
        processed.append(input_ids.shape[-1])
        return forward(input_ids, *args, **kwargs)

    model.forward = counting_forward
    try:
        _, got, _ = run_stream(streamer, longer, max_new_tokens=4)
    finally:
        del model.forward
    # the prompt's first tokens were cached: only the new tail is prefilled, then one token per step
    assert processed[0] < longer.shape[-1] - 1 - 2
    assert got == tokens[6:10]


def test_probabilities_top_tokens_and_logits(parts, streamer, greedy):
    ids, tokens, _ = greedy
    streamer.set_stop_conditions([])
    streamer.begin_stream_ex(ids, ExLlamaV2Sampler.Settings.greedy(), return_probabilities=True,
                             return_top_tokens=3, return_logits=True, max_new_tokens=3)
    r = streamer.stream_ex()
    n = r["chunk_token_ids"].shape[-1]
    assert n >= 1
    assert r["probs"].shape == (1, n) and torch.all(r["probs"] > 0)
    assert r["top_tokens"].shape == (1, n, 3) and r["top_probs"].shape == (1, n, 3)
    assert r["top_tokens"][0, :, 0].tolist() == r["chunk_token_ids"][0].tolist()
    assert r["logits"].shape[:2] == (1, n)
    assert r["logits"][0].argmax(-1).tolist() == tokens[:n]


def test_bad_inputs(parts, streamer):
    model, tokenizer = parts
    with pytest.raises(ValueError, match="stop_conditions"):
        streamer.set_stop_conditions([1.5])
    with pytest.raises(ValueError, match="batch"):
        streamer.begin_stream_ex(torch.zeros((3, 4), dtype=torch.long), ExLlamaV2Sampler.Settings.greedy())
    with pytest.raises(RuntimeError, match="begin_stream_ex"):
        ExLlamaV2StreamingGenerator(model, streamer.cache, tokenizer).stream_ex()
    gen = ExLlamaV2BaseGenerator(model, ExLlamaV2Cache(model, max_seq_len=32), tokenizer)
    with pytest.raises(ValueError, match="batch_size"):
        gen.generate_simple(["a", "b"], ExLlamaV2Sampler.Settings.greedy(), 2)
    with pytest.raises(ValueError, match="max_seq_len"):
        gen.generate_simple("hello", ExLlamaV2Sampler.Settings.greedy(), 100)


def test_speculative_decoding_with_draft_model_keeps_greedy_output(parts, greedy):
    model, tokenizer = parts
    ids, tokens, text = greedy
    # the model as its own draft: every confident draft token is accepted, and the output must not change
    gen = ExLlamaV2StreamingGenerator(model, ExLlamaV2Cache(model, max_seq_len=256), tokenizer, draft_model=model,
                                      num_speculative_tokens=4)
    chunks, got, last = run_stream(gen, ids, max_new_tokens=N)
    assert got == tokens and "".join(chunks) == text
    efficiency, accuracy, total, drafted, accepted = gen.get_sd_stats()
    assert total == N and 0 < accepted <= drafted and accuracy > 0.5
