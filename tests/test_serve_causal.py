"""A causal base served for real, beside a T5 base in the same app: a real causal sweep
(`experiments/tune_causal.py`, the embedded tiny Llama) publishes adapters; `serve run` serves
its registry and the session's T5 registry together; the official `openai` client calls
/v1/completions and /v1/chat/completions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import requests
from openai import OpenAI

from tests.conftest import ROOT
from tests.test_serve import SERVE_ARGS, SOURCES, ServeApp

TUNE_CAUSAL = [sys.executable, str(ROOT / "experiments" / "tune_causal.py")]


@pytest.fixture(scope="module")
def causal_sweep(cache_dir, tmp_path_factory) -> Path:
    """The causal default (embedded tiny Llama, prompt template) shrunk to two short trials."""
    out = tmp_path_factory.mktemp("causal-runs")
    proc = subprocess.run([*TUNE_CAUSAL, "--num-samples", "2", "--max-steps", "6", "--eval-every", "3",
                           "--train-size", "32", "--eval-size", "8", "--top-k", "2", "--address", "local",
                           "--output-dir", str(out)],
                          cwd=ROOT, env=dict(os.environ, RAY_DEDUP_LOGS="0"), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "registry"


@pytest.fixture(scope="module")
def app(causal_sweep, sweep, tmp_path_factory):
    """One app, two registries: the causal one first, the T5 sweep's second."""
    workdir = tmp_path_factory.mktemp("serve-causal")
    server = ServeApp(causal_sweep, workdir, SERVE_ARGS | {"registry": [str(causal_sweep),
                                                                         str(sweep["out"] / "registry")]})
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(app) -> OpenAI:
    return OpenAI(base_url=f"{app.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ids(app, sweep) -> dict:
    causal, t5 = app.index(), sweep["index"]
    return {"causal_base": Path(causal["base_model"]).name, "causal": [a["id"] for a in causal["adapters"]],
            "t5_base": Path(t5["base_model"]).name, "t5": [a["id"] for a in t5["adapters"]],
            "causal_index": causal}


def test_both_registries_are_listed(client, ids):
    models = {m.id: m for m in client.models.list().data}
    for base, adapters in (("causal_base", "causal"), ("t5_base", "t5")):
        assert ids[base] in models
        for adapter_id in ids[adapters]:
            if adapter_id not in ids["causal"] or adapters == "causal":  # the first registry wins an id
                assert models[adapter_id].parent == ids[base]


def test_native_listing_names_each_registry(app, ids):
    body = requests.get(f"{app.url}/v1/adapters", timeout=30).json()
    # (paths are shown as names unless the server is started with show_paths)
    assert [r["base_model"] for r in body["registries"]] == [ids["causal_base"], ids["t5_base"]]
    assert {a["id"] for a in body["adapters"]} == set(ids["causal"]) | set(ids["t5"])
    assert body["default"] == ids["causal_index"]["default"]


def test_completion_uses_the_adapters_prompt_template(client, ids):
    """The served prompt is the training prompt: the template around the text, BOS first."""
    from transformers import AutoTokenizer

    adapter_id = ids["causal"][0]
    entry = next(a for a in ids["causal_index"]["adapters"] if a["id"] == adapter_id)
    template = entry["task"]["prompt_template"]
    tokenizer = AutoTokenizer.from_pretrained(ids["causal_index"]["base_model"])
    expected = len(tokenizer(template.replace("{text}", SOURCES[0]))["input_ids"])
    c = client.completions.create(model=adapter_id, prompt=SOURCES[0], max_tokens=8)
    assert c.object == "text_completion" and c.model == adapter_id
    assert c.usage.prompt_tokens == expected
    assert 1 <= c.usage.completion_tokens <= 8 and c.choices[0].finish_reason in ("stop", "length")


def test_t5_and_causal_adapters_answer_side_by_side(client, ids):
    # ignore_eos: a trained adapter may well answer EOS first; here both must decode, whatever they say.
    causal = client.completions.create(model=ids["causal"][0], prompt=SOURCES[1], max_tokens=6,
                                       extra_body={"ignore_eos": True})
    t5 = client.completions.create(model=ids["t5"][0], prompt=SOURCES[1], max_tokens=6, extra_body={"ignore_eos": True})
    assert causal.model == ids["causal"][0] and t5.model == ids["t5"][0]
    assert causal.usage.completion_tokens == 6 and t5.usage.completion_tokens == 6
    assert causal.choices[0].finish_reason == t5.choices[0].finish_reason == "length"


def _tokenizer(ids):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ids["causal_index"]["base_model"])


def test_chat_completion_formats_like_the_adapters_training_prompts(client, ids):
    """The adapter was trained on prompt-completion rows: a one-message chat becomes its training prompt
    (the template around the message, BOS first), as /v1/completions would send it."""
    adapter_id = ids["causal"][0]
    entry = next(a for a in ids["causal_index"]["adapters"] if a["id"] == adapter_id)
    messages = [{"role": "user", "content": SOURCES[0]}]
    c = client.chat.completions.create(model=adapter_id, messages=messages, max_completion_tokens=8)
    assert c.id.startswith("chatcmpl-") and c.object == "chat.completion" and c.model == adapter_id
    choice = c.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length") and c.usage.completion_tokens >= 1
    prompt = entry["task"]["prompt_template"].replace("{text}", SOURCES[0])
    assert c.usage.prompt_tokens == len(_tokenizer(ids)(prompt)["input_ids"])
    same = client.completions.create(model=adapter_id, prompt=SOURCES[0], max_tokens=8)
    assert same.choices[0].text == choice.message.content  # greedy, same prompt tokens

    # streamed: the role first, then content that adds up to the same (greedy) answer
    stream = client.chat.completions.create(model=adapter_id, messages=messages, max_completion_tokens=8,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == choice.message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == c.usage.completion_tokens
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finish == [choice.finish_reason]


def test_chat_with_n_choices_and_text_parts(client, ids):
    c = client.chat.completions.create(
        model=ids["causal"][1], n=2, temperature=0.8, seed=3, max_tokens=5,
        messages=[{"role": "user", "content": [{"type": "text", "text": SOURCES[2]}]}])
    assert sorted(ch.index for ch in c.choices) == [0, 1]


def test_conversations_to_a_prompt_trained_adapter_are_400s(client, ids):
    """A system turn or several turns have no place in the prompt the adapter was trained on."""
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=ids["causal"][0], max_tokens=4,
                                       messages=[{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": SOURCES[2]}])
    assert "one user message" in e.value.message and e.value.param == "messages"


def test_chat_with_the_base_uses_the_tokenizers_chat_template(client, ids):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Summarize this Python definition:\n\n" + SOURCES[0]},
                {"role": "assistant", "content": "It adds."},
                {"role": "user", "content": "And in one word?"}]
    c = client.chat.completions.create(model=ids["causal_base"], messages=messages, max_completion_tokens=6)
    assert c.model == ids["causal_base"] and c.usage.completion_tokens >= 1
    tokenizer = _tokenizer(ids)
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert c.usage.prompt_tokens == len(tokenizer(rendered, add_special_tokens=False)["input_ids"])


def test_chat_for_the_t5_base_is_refused_with_a_reason(client, ids):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=ids["t5"][0], messages=[{"role": "user", "content": "hi"}])
    assert "sequence-to-sequence" in e.value.message


@pytest.mark.parametrize(("body", "param"), [
    ({}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "max_completion_tokens": 5}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "prompt": "x"}, "prompt"),
])
def test_bad_chat_requests_are_400s_naming_the_parameter(app, ids, body, param):
    r = requests.post(f"{app.url}/v1/chat/completions", json={"model": ids["causal"][0]} | body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    ok = requests.post(f"{app.url}/v1/chat/completions", timeout=120,
                       json={"model": ids["causal"][0], "messages": [{"role": "user", "content": "hi"}],
                             "max_tokens": 2})
    assert ok.status_code == 200, ok.text


def test_native_summarize_with_a_causal_adapter(app, ids):
    r = requests.post(f"{app.url}/v1/summarize", timeout=120,
                      json={"text": [SOURCES[0], SOURCES[3]], "adapter": ids["causal"][0], "max_new_tokens": 6})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["adapter"] == ids["causal"][0] and len(body["summary"]) == 2
    stats = requests.get(f"{app.url}/v1/stats", timeout=30).json()
    assert len(stats["registries"]) == 2 and ids["causal"][0] in json.dumps(stats["registries"][0])
