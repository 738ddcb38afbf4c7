"""Per-request interventions through the OpenAI-compatible server (live uvicorn in a thread, the `openai` client):
steered text equals the padded-batch reference, plain requests beside it are untouched, bad specs get 400 with
the validator's message, steering files come only from --interventions-dir, and no hook outlives its request."""

from __future__ import annotations

import concurrent.futures as cf

import httpx
import openai
import pytest
import torch

from exllamav2 import ExLlamaV2Cache
from exllamav2.generator.dynamic_async import ExLlamaV2DynamicGeneratorAsync
from exllamav2.interventions import InterventionRequestError, SteeringVectors, from_request, wrapped_slots
from exllamav2.server import ServerEngine, start_in_thread
from test_dynamic_interventions import reference, steer
from test_dynamic_tiny import PAGE, tiny  # noqa: F401  (fixture)
from test_server import wait_all_free

N = 12
PROMPT = "The capital of France is"
ADD = [{"point": "blocks.0.resid_post", "edit": "add", "vector": steer(11, 4.0), "positions": "generated"}]
ZERO = [{"point": "blocks.1.mlp_out", "edit": "zero"}, {"point": "blocks.0.attn_out", "edit": "scale", "scale": 3.0}]


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    _, model, tok = tiny
    folder = tmp_path_factory.mktemp("steering")
    SteeringVectors({1: torch.tensor(steer(12, 5.0))}, "resid_pre", "tiny").save(str(folder / "push.safetensors"))
    cache = ExLlamaV2Cache(model, 1, 64 * PAGE)
    gen = ExLlamaV2DynamicGeneratorAsync(model, cache, tok, max_batch_size=8, max_chunk_size=16, page_size=PAGE)
    engine = ServerEngine(model, tok, gen, "tiny", max_queue=64, interventions_dir=str(folder))
    srv = start_in_thread(engine)
    yield srv, engine
    srv.stop()
    engine.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0].url + "/v1", api_key="none", max_retries=0, timeout=120)


def ref_text(tiny, ids, specs=(), file_root=None) -> str:
    _, model, tok = tiny
    out = reference(model, ids, N, specs, file_root)
    eos = set(tok.eos_token_ids)
    cut = next((i for i, t in enumerate(out) if t in eos), len(out))
    return tok.decode(torch.tensor(out[:cut], dtype=torch.long))


def complete(client, prompt, interventions=None, **kw) -> str:
    extra = {"interventions": interventions} if interventions is not None else None
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=N, temperature=0, extra_body=extra, **kw)
    return r.choices[0].text


@pytest.mark.parametrize("specs", [ADD, ZERO], ids=["add", "zero"])
def test_completion_with_intervention_equals_reference(tiny, server, client, specs):
    _, model, tok = tiny
    ids = tok.encode(PROMPT)
    plain, steered = complete(client, PROMPT), complete(client, PROMPT, specs)
    assert plain == ref_text(tiny, ids)
    assert steered != plain
    assert steered == ref_text(tiny, ids, specs)
    stream = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=N, temperature=0, stream=True,
                                       extra_body={"interventions": specs})
    assert "".join(c.choices[0].text for c in stream if c.choices) == steered
    assert wait_all_free(server[1]) and not wrapped_slots(model)


def test_concurrent_plain_and_steered_requests(tiny, server, client):
    _, model, tok = tiny
    prompts = ["Once upon a time", "def main():\n", "Roses are red,", "1, 2, 3, 4, 5,"]
    jobs = [(p, ADD if i % 2 else None) for i, p in enumerate(prompts)]
    with cf.ThreadPoolExecutor(len(jobs)) as ex:
        got = list(ex.map(lambda a: complete(client, *a), jobs))
    for (p, specs), text in zip(jobs, got):
        assert text == ref_text(tiny, tok.encode(p), specs or ())
    assert wait_all_free(server[1]) and not wrapped_slots(model)


def test_chat_with_steering_file(tiny, server, client):
    _, model, tok = tiny
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    specs = [{"point": "blocks.1.resid_pre", "edit": "add", "file": "push.safetensors", "scale": 1.5}]
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=N, temperature=0,
                                       extra_body={"interventions": specs})
    ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), encode_special_tokens=True)
    folder = server[1].interventions_dir
    assert r.choices[0].message.content == ref_text(tiny, ids, specs, folder)
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=N, temperature=0)
    assert plain.choices[0].message.content != r.choices[0].message.content
    assert wait_all_free(server[1]) and not wrapped_slots(model)


BAD = [
    [{"point": "blocks.7.resid_post", "edit": "zero"}],
    [{"point": "embed", "edit": "add", "vector": [1.0, 2.0]}],
    [{"point": "embed", "edit": "zero", "colour": "red"}],
    [{"point": "embed", "edit": "clamp", "min": 2.0, "max": 1.0}],
    [{"point": "embed", "edit": "add", "file": "../outside.safetensors"}],
    [{"point": "embed", "edit": "add", "file": "missing.safetensors"}],
]


@pytest.mark.parametrize("items", BAD)
@pytest.mark.parametrize("route", ["completions", "chat/completions"])
def test_invalid_specs_get_400_with_the_validators_message(tiny, server, items, route):
    _, model, _ = tiny
    with pytest.raises(InterventionRequestError) as expected:
        from_request(model, items, file_root=server[1].interventions_dir)
    body = {"model": "tiny", "max_tokens": 4, "interventions": items}
    body.update({"prompt": "hi"} if route == "completions" else {"messages": [{"role": "user", "content": "hi"}]})
    r = httpx.post(f"{server[0].url}/v1/{route}", json=body, timeout=60)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["message"] == str(expected.value) and err["param"] == "interventions"
    assert not wrapped_slots(model)


def test_files_need_an_interventions_dir(tiny, server):
    engine = server[1]
    folder, engine.interventions_dir = engine.interventions_dir, None
    try:
        body = {"prompt": "hi", "max_tokens": 4,
                "interventions": [{"point": "blocks.1.resid_pre", "edit": "add", "file": "push.safetensors"}]}
        r = httpx.post(f"{server[0].url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 400
        assert "--interventions-dir" in r.json()["error"]["message"]
        body["interventions"] = ADD  # inline vectors need no folder
        assert httpx.post(f"{server[0].url}/v1/completions", json=body, timeout=60).status_code == 200
    finally:
        engine.interventions_dir = folder
    assert wait_all_free(engine) and not wrapped_slots(tiny[1])


def test_serve_option(tmp_path):
    import argparse

    from exllamav2.commands import serve

    sub = argparse.ArgumentParser().add_subparsers()
    serve.add_parser(sub)
    args = sub.choices["serve"].parse_args(["--interventions-dir", str(tmp_path)])
    assert args.interventions_dir == str(tmp_path)
    args.interventions_dir = str(tmp_path / "nope")
    with pytest.raises(SystemExit, match="interventions-dir"):
        serve.run(args)
