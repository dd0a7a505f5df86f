"""The OpenAI-compatible API for real, through the official `openai` client and raw HTTP
(the server of test_serve.py, shared: one per session)."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
import requests
from openai import OpenAI

from qlora_ray.serving.guards import ApiError
from qlora_ray.serving.openai_api import TEXT, StreamUsage, parse_completion_request
from qlora_ray.serving.protocol import Completion, GenerationResult, StreamChunk
from qlora_ray.serving.settings import ServeSettings
from tests.test_serve import SOURCES, assert_serving, post_raw, registered_adapter, server  # noqa: F401


@pytest.fixture(scope="module")
def client(server) -> OpenAI:  # noqa: F811
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ids(server) -> dict:  # noqa: F811
    index = server.index()
    return {"base": Path(index["base_model"]).name, "default": index["default"],
            "adapters": [a["id"] for a in index["adapters"]]}


# ---------------------------------------------------------------------------------------------
# Models


def test_models_list_the_base_then_every_adapter(client, ids):
    models = client.models.list().data
    assert [m.id for m in models] == [ids["base"], *ids["adapters"]]
    assert all(m.object == "model" and m.owned_by == "qlora-ray" and isinstance(m.created, int) for m in models)
    base, *adapters = models
    assert getattr(base, "parent", None) is None
    assert all(m.parent == ids["base"] for m in adapters)


def test_retrieve_a_model(client, ids):
    assert client.models.retrieve(ids["default"]).id == ids["default"]
    assert client.models.retrieve(ids["base"]).id == ids["base"]
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert e.value.code == "model_not_found"


# ---------------------------------------------------------------------------------------------
# Completions


def test_completion_from_an_adapter(client, ids):
    c = client.completions.create(model=ids["default"], prompt=SOURCES[0], max_tokens=8)
    assert c.id.startswith("cmpl-") and c.object == "text_completion" and c.model == ids["default"]
    (choice,) = c.choices
    assert choice.index == 0 and choice.logprobs is None and choice.finish_reason in ("stop", "length")
    assert isinstance(choice.text, str) and choice.text.strip()
    assert 0 < c.usage.completion_tokens <= 8 and c.usage.prompt_tokens > 0
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens


def test_completion_from_the_base_model(client, ids):
    c = client.completions.create(model=ids["base"], prompt=SOURCES[0], max_tokens=4, extra_body={"ignore_eos": True})
    assert c.model == ids["base"] and c.usage.completion_tokens == 4
    assert c.choices[0].finish_reason == "length"


def test_adapters_answer_as_the_native_api_does(server, client, ids):  # noqa: F811
    native = requests.post(f"{server.url}/v1/summarize", json={"text": SOURCES[1], "adapter": ids["adapters"][1],
                                                               "max_new_tokens": 12}, timeout=120).json()
    c = client.completions.create(model=ids["adapters"][1], prompt=SOURCES[1], max_tokens=12, temperature=0)
    assert c.choices[0].text.strip() == native["summary"]


def test_several_prompts_and_choices(client, ids):
    c = client.completions.create(model=ids["default"], prompt=SOURCES[:2], max_tokens=6, n=2, temperature=0.9,
                                  seed=7)
    assert [ch.index for ch in c.choices] == [0, 1, 2, 3]
    single = [client.completions.create(model=ids["default"], prompt=p, max_tokens=6, temperature=0).usage
              for p in SOURCES[:2]]
    assert c.usage.prompt_tokens == sum(u.prompt_tokens for u in single)  # counted once per prompt
    again = client.completions.create(model=ids["default"], prompt=SOURCES[:2], max_tokens=6, n=2,
                                      temperature=0.9, seed=7)
    assert [ch.text for ch in again.choices] == [ch.text for ch in c.choices]  # seeded: reproducible


def test_stop_sequences_cut_the_text(client, ids):
    full = client.completions.create(model=ids["base"], prompt=SOURCES[2], max_tokens=16,
                                     extra_body={"ignore_eos": True}).choices[0].text
    cut = full.strip()[len(full.strip()) // 2:][:3]
    if not cut.strip():
        pytest.skip(f"no usable stop string in {full!r}")
    c = client.completions.create(model=ids["base"], prompt=SOURCES[2], max_tokens=16, stop=[cut],
                                  extra_body={"ignore_eos": True})
    assert cut not in c.choices[0].text and c.choices[0].finish_reason == "stop"
    assert full.startswith(c.choices[0].text)


def test_streaming_matches_the_plain_answer(client, ids):
    plain = client.completions.create(model=ids["default"], prompt=SOURCES[0], max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model=ids["default"], prompt=SOURCES[0], max_tokens=10, temperature=0,
                                            stream=True))
    assert chunks and all(ch.object == "text_completion" and ch.id == chunks[0].id for ch in chunks)
    assert "".join(ch.choices[0].text for ch in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert all(ch.choices[0].finish_reason is None for ch in chunks[:-1])


def test_streaming_with_usage(client, ids):
    chunks = list(client.completions.create(model=ids["default"], prompt=SOURCES[:2], max_tokens=5, n=2,
                                            temperature=0.5, seed=1, stream=True,
                                            stream_options={"include_usage": True}))
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens > 0
    assert all(ch.usage is None for ch in body)
    finished = {ch.choices[0].index for ch in body if ch.choices[0].finish_reason}
    assert finished == {0, 1, 2, 3}


def test_raw_stream_is_server_sent_events(server, ids):  # noqa: F811
    r = requests.post(f"{server.url}/v1/completions", stream=True, timeout=120,
                      json={"model": ids["default"], "prompt": SOURCES[0], "max_tokens": 4, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [e for e in r.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"


# ---------------------------------------------------------------------------------------------
# Errors


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-adapter", prompt="x")
    assert e.value.code == "model_not_found" and e.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-adapter", prompt="x", stream=True)


def test_malformed_model_id(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="../../etc/passwd", prompt="x")
    assert e.value.param == "model"


def test_a_chat_for_a_seq2seq_model_is_a_400(client, ids):
    # T5 has no chat format: the answer says where to go instead (tests/test_serve_causal.py serves chats
    # from a causal base).
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=ids["default"], messages=[{"role": "user", "content": "hi"}])
    assert "/v1/completions" in e.value.message and e.value.code == "unsupported"


@pytest.mark.parametrize(("params", "param"), [
    ({"logprobs": 2}, "logprobs"), ({"echo": True}, "echo"), ({"best_of": 2}, "best_of"),
    ({"suffix": "x"}, "suffix"), ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -1}, "frequency_penalty"), ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"extra_body": {"min_tokens": 5}}, "min_tokens"), ({"extra_body": {"messages": []}}, "messages"),
    ({"temperature": 2.5}, "temperature"), ({"temperature": -0.1}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"n": 0}, "n"), ({"n": 17}, "n"), ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 100_000}, "max_tokens"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": ""}, "stop"),
    ({"seed": 2**64}, "seed"), ({"prompt": []}, "prompt"), ({"prompt": [1, 2, 3]}, "prompt"),
    ({"prompt": "\u200b"}, "prompt"), ({"prompt": "x" * 20_001}, "prompt"), ({"prompt": ["x"] * 33}, "prompt"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_invalid_parameters_are_named(client, ids, params, param):
    args = {"model": ids["default"], "prompt": "def f(): pass", "max_tokens": 4} | params
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**args)
    assert e.value.param == param and e.value.type == "invalid_request_error", e.value.body


def test_ignored_and_neutral_parameters_are_accepted(client, ids):
    c = client.completions.create(model=ids["default"], prompt=SOURCES[0], max_tokens=4, user="someone",
                                  echo=False, best_of=1, presence_penalty=0, frequency_penalty=0.0, logit_bias={},
                                  logprobs=None, suffix=None, stop=None, seed=None, n=None)
    assert c.choices


def test_rejected_adapter_is_unprocessable(server, client):  # noqa: F811
    with registered_adapter(server, "broken-adapter", weights=b"not safetensors"):
        with pytest.raises(openai.UnprocessableEntityError) as e:
            client.completions.create(model="broken-adapter", prompt="x")
        assert e.value.code == "adapter_rejected" and "rejected" in e.value.message
    assert_serving(server)


RAW = [
    (b"{not json", "JSON"),
    (b'{"model": "m", "prompt": "\xff"}', "UTF-8"),
    (b'{"model": "m", "prompt": "x", "max_tokens": ' + b"1" * 5000 + b"}", "out of range"),
    (b'{"model": "m", "prompt": "x", "temperature": NaN}', "NaN"),
    (b'{"model": "m", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested"),
    (b'[{"model": "m"}]', "JSON object"),
]


@pytest.mark.parametrize(("data", "message"), RAW, ids=[str(i) for i in range(len(RAW))])
def test_malformed_bodies_get_the_openai_envelope(server, data, message):  # noqa: F811
    r = post_raw(server, "/v1/completions", data)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert message in error["message"] and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}
    assert_serving(server)


def test_prompt_with_a_lone_surrogate(server, ids):  # noqa: F811
    r = post_raw(server, "/v1/completions", b'{"model": "%s", "prompt": ["ok", "\\udc80"]}' % ids["default"].encode())
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt" and "surrogate" in r.text
    assert_serving(server)


# ---------------------------------------------------------------------------------------------
# Request parsing and response shapes (no server)

SETTINGS = ServeSettings()


def test_parse_defaults():
    p = parse_completion_request({"model": "m", "prompt": "x"}, SETTINGS)
    assert (p.prompts, p.max_tokens, p.temperature, p.top_p, p.n, p.stop, p.seed, p.stream) == (
        ["x"], None, 0.0, 1.0, 1, [], None, False)


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "x"}, "model"), ({"model": 3, "prompt": "x"}, "model"), ({"model": "m"}, "prompt"),
    ({"model": "m", "prompt": "x", "n": True}, "n"), ({"model": "m", "prompt": "x", "max_tokens": 2.0}, "max_tokens"),
    ({"model": "m", "prompt": "x", "stream": "yes"}, "stream"), ({"model": "m", "prompt": "x", "user": 1}, "user"),
    ({"model": "m", "prompt": "x", "stream": True, "stream_options": {"x": 1}}, "stream_options"),
    ({"model": "m", "prompt": "x", "temperature": 10**400}, "temperature"),
    ({"model": "m", "prompt": "x", "stop": ["\ud800"]}, "stop"),
    ({"model": "m", "prompt": ["a"] * 20, "n": 2}, "n"),
])
def test_parse_rejects(body, param):
    with pytest.raises(ApiError) as e:
        parse_completion_request(body, SETTINGS)
    assert e.value.status == 400 and e.value.param == param


def test_completion_body_counts_prompt_tokens_once_per_prompt():
    result = GenerationResult("a", [Completion(i, i // 2, f"t{i}", "stop", 10 + i // 2, 3) for i in (3, 0, 2, 1)])
    body = TEXT.body("cmpl-1", 5, "a", result)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"] == {"prompt_tokens": 21, "completion_tokens": 12, "total_tokens": 33}


def test_stream_usage():
    counts = StreamUsage(n=2)
    for chunk in [StreamChunk(0, "a", None, 5, 1), StreamChunk(1, "b", None, 5, 1), StreamChunk(0, "c", "stop", 5, 2),
                  StreamChunk(2, "d", "length", 7, 1)]:
        counts.add(chunk)
    assert counts.body() == {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16}
