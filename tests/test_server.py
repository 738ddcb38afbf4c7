"""The OpenAI-compatible server, live on 127.0.0.1 (uvicorn in a thread), driven by the official `openai` client
and httpx; the model is the tiny random Llama with SmolLM2's tokenizer in fp32."""

from __future__ import annotations

import concurrent.futures as cf
import gc
import json
import time
import tracemalloc

import httpx
import openai
import pytest
import torch

from exllamav2 import ExLlamaV2Cache
from exllamav2.generator.dynamic_async import ExLlamaV2DynamicGeneratorAsync
from exllamav2.server import ServerEngine, start_in_thread
from test_dynamic_tiny import PAGE, greedy_reference, tiny  # noqa: F401  (fixture)

KEY = "sk-test"
PROMPTS = ["The capital of France is", "Once upon a time", "def main():\n", "1, 2, 3, 4, 5,", "Hello there, how are",
           "In 1492 Columbus", "The quick brown fox jumps over the lazy dog. " * 2, "A", "Why is the sky blue?",
           "Recipe: take two eggs", "SELECT * FROM", "import torch\n", "Dear Sir or Madam,", "x = [1, 2", "The end",
           "Roses are red,"]


@pytest.fixture(scope="module")
def server(tiny):
    _, model, tok = tiny
    cache = ExLlamaV2Cache(model, 1, 128 * PAGE)
    gen = ExLlamaV2DynamicGeneratorAsync(model, cache, tok, max_batch_size=16, max_chunk_size=32, page_size=PAGE)
    engine = ServerEngine(model, tok, gen, "tiny", max_queue=64)
    srv = start_in_thread(engine, api_key=KEY)
    yield srv, engine
    srv.stop()
    engine.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0].url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def reference_text(tok, model, ids, n):
    ref = greedy_reference(model, ids, n, stop_ids=set(tok.eos_token_ids))
    if ref and ref[-1] in tok.eos_token_ids:
        ref = ref[:-1]
    return tok.decode(torch.tensor(ref, dtype=torch.long))


def wait_all_free(engine, timeout=20.0):
    pt = engine.generator.generator.page_table
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pt.num_free_pages() == pt.num_pages and engine.generator.num_remaining_jobs() == 0:
            return True
        time.sleep(0.05)
    return False


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server[0].url + "/health").json()["status"] == "ok"


def test_completion_greedy_equals_engine(tiny, client):
    _, model, tok = tiny
    for prompt in PROMPTS[:3]:
        ref = reference_text(tok, model, tok.encode(prompt), 12)
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
        assert r.choices[0].text == ref
        assert r.usage.prompt_tokens == tok.encode(prompt).shape[1]
        assert r.usage.completion_tokens >= 1 and r.choices[0].finish_reason in ("length", "stop")
        chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                                stream=True))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == ref
        assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_completion_echo_puts_the_prompt_first(tiny, client):
    _, model, tok = tiny
    prompts = PROMPTS[:2]
    refs = [reference_text(tok, model, tok.encode(p), 6) for p in prompts]
    r = client.completions.create(model="tiny", prompt=prompts, max_tokens=6, temperature=0, echo=True, n=2)
    assert [c.text for c in r.choices] == [p + ref for p, ref in zip(prompts, refs) for _ in range(2)]
    assert r.usage.prompt_tokens == sum(tok.encode(p).shape[1] for p in prompts)
    chunks = list(client.completions.create(model="tiny", prompt=prompts[0], max_tokens=6, temperature=0, echo=True,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == prompts[0] + refs[0]
    with pytest.raises(openai.BadRequestError, match="echo"):
        client.completions.create(model="tiny", prompt=prompts[0], max_tokens=2, echo=True, logprobs=1)


def test_chat_greedy_equals_engine(tiny, client):
    _, model, tok = tiny
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    ids = tok.encode(text, encode_special_tokens=True)
    ref = reference_text(tok, model, ids, 10)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                       logprobs=True, top_logprobs=2)
    assert r.choices[0].message.content == ref and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == ids.shape[1]
    lp = r.choices[0].logprobs.content[0]
    expect = torch.log_softmax(model.forward(ids)[0, -1], -1)
    assert lp.logprob == pytest.approx(float(expect.max()), abs=1e-4) and len(lp.top_logprobs) == 2
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_sixteen_concurrent_streams_equal_alone(tiny, client, server):
    _, model, tok = tiny
    lengths = [4 + (i * 5) % 17 for i in range(16)]
    refs = [reference_text(tok, model, tok.encode(p), n) for p, n in zip(PROMPTS, lengths)]

    def one(i):
        s = client.completions.create(model="tiny", prompt=PROMPTS[i], max_tokens=lengths[i], temperature=0,
                                      stream=True)
        return "".join(c.choices[0].text for c in s if c.choices)

    with cf.ThreadPoolExecutor(16) as ex:
        got = list(ex.map(one, range(16)))
    assert got == refs
    assert wait_all_free(server[1])


def test_seed_and_n(client):
    kw = dict(model="tiny", prompt="Once", max_tokens=8, temperature=1.0, seed=11, n=2)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and len(a.choices) == 2
    assert [c.index for c in a.choices] == [0, 1]
    # the first choice is the seed's own; the others' seeds are not the next seeds' first
    one = client.completions.create(**{**kw, "n": 1})
    assert one.choices[0].text == a.choices[0].text
    from exllamav2.server.engine import job_seed
    seeds = {job_seed(type("R", (), {"seed": s})(), i) for s in range(11, 43) for i in range(4)}
    assert len(seeds) == 32 * 4


@pytest.mark.parametrize("body,status,param", [
    ({"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ({"prompt": "hi", "temperature": "0.5"}, 400, "temperature"),
    ({"prompt": "hi", "temperature": 7}, 400, "temperature"),
    ({"prompt": "word " * 600}, 400, "prompt"),
    ({"prompt": "hi", "model": "gpt-17"}, 404, "model"),
    ({"max_tokens": 3}, 400, "prompt"),
    ({"prompt": "hi", "interventions": "steer"}, 400, "interventions"),
    ({"prompt": "hi", "interventions": [{"point": "nowhere", "edit": "zero"}]}, 400, "interventions"),
])
def test_bad_requests(server, body, status, param):
    r = httpx.post(server[0].url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and param in (err["param"] or "")
    # the server is still fine
    ok = httpx.post(server[0].url + "/v1/completions", json={"prompt": "hi", "max_tokens": 1},
                    headers={"Authorization": f"Bearer {KEY}"})
    assert ok.status_code == 200


def test_auth_and_unknown_fields(server):
    url = server[0].url + "/v1/completions"
    r = httpx.post(url, json={"prompt": "hi", "max_tokens": 1})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(url, json={"prompt": "hi", "max_tokens": 1, "frobnicate": 3},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    r = httpx.post(server[0].url + "/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400


@pytest.mark.parametrize("body", [b'{"prompt": "h\xff"}', b'{"prompt": ', b'\x00{}', b'prompt=hi'])
def test_a_body_that_is_not_json_names_the_body(server, body):
    r = httpx.post(server[0].url + "/v1/completions", content=body,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "body" and err["message"].startswith("body: "), r.text


def test_disconnect_cancels_and_frees_pages(server):
    srv, engine = server
    pt = engine.generator.generator.page_table
    with httpx.Client(timeout=60) as c:
        with c.stream("POST", srv.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"prompt": "Tell me a long story", "max_tokens": 400, "temperature": 0,
                            "stream": True}) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"]
            assert pt.num_free_pages() < pt.num_pages  # the job holds pages while streaming
    assert wait_all_free(engine)


def test_many_requests_leave_memory_flat(server, client):
    srv, engine = server
    pt = engine.generator.generator.page_table

    def burst(n):
        for i in range(n):
            client.completions.create(model="tiny", prompt=PROMPTS[i % 16], max_tokens=2, temperature=0)

    burst(20)  # warm-up: caches, pools
    assert wait_all_free(engine)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    burst(200)
    assert wait_all_free(engine)
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert grown < 2 * 1024 * 1024, f"{grown} bytes still allocated after 200 requests"
    assert engine.generator.generator.pending == [] and engine.generator.generator.active == []
    assert len(engine.generator.jobs) == 0
    assert pt.num_cached_pages() <= pt.num_pages
