"""`serve run serve.app` for real: HTTP requests against the sweep's registry."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import requests

from tests.conftest import ROOT

URL = "http://127.0.0.1:8000"
SOURCES = [
    "def add(a, b):\n    return a + b",
    "def read_lines(path):\n    with open(path) as f:\n        return f.read().splitlines()",
    "class Stack:\n    def __init__(self):\n        self.items = []\n"
    "    def push(self, x):\n        self.items.append(x)",
    "def is_empty(self):\n    return len(self._queue) == 0",
]


@pytest.fixture(scope="module")
def server(sweep):
    env = dict(os.environ, QLORA_RAY_REGISTRY=str(sweep["out"] / "registry"), QLORA_RAY_MAX_ADAPTERS_PER_REPLICA="2")
    proc = subprocess.Popen(["serve", "run", "serve.app"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                if requests.get(f"{URL}/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or still starting
                pass
            time.sleep(2)
        else:
            pytest.fail("serve run did not become healthy")
        yield sweep["index"]
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        subprocess.run(["ray", "stop", "--force"], capture_output=True)


def summarize(body, **kw) -> requests.Response:
    return requests.post(f"{URL}/v1/summarize", json=body, timeout=120, **kw)


def test_lists_adapters(server):
    body = requests.get(f"{URL}/v1/adapters", timeout=10).json()
    assert body["default"] == server["default"]
    assert [a["id"] for a in body["adapters"]] == [a["id"] for a in server["adapters"]]
    assert all("metrics" in a and "hyperparameters" in a for a in body["adapters"])


def test_default_and_second_adapter_differ(server):
    first = summarize({"text": SOURCES, "max_new_tokens": 16})
    assert first.status_code == 200, first.text
    assert first.json()["adapter"] == server["default"]
    default_out = first.json()["summary"]
    assert isinstance(default_out, list) and len(default_out) == len(SOURCES)
    others = [a["id"] for a in server["adapters"][1:]]
    outs = {}
    for adapter in others:
        r = summarize({"text": SOURCES, "adapter": adapter, "max_new_tokens": 16})
        assert r.status_code == 200 and r.json()["adapter"] == adapter
        outs[adapter] = r.json()["summary"]
    assert any(out != default_out for out in outs.values()), (default_out, outs)
    # Same adapter, same input, same output: greedy, and no other adapter leaked in
    # (three adapters cycled through a replica that holds two).
    again = summarize({"text": SOURCES, "max_new_tokens": 16}).json()["summary"]
    assert again == default_out


def test_single_text_in_single_text_out(server):
    r = summarize({"text": SOURCES[0], "max_new_tokens": 4})
    assert r.status_code == 200 and isinstance(r.json()["summary"], str)


def test_concurrent_requests_for_different_adapters(server):
    from concurrent.futures import ThreadPoolExecutor

    ids = [a["id"] for a in server["adapters"]]
    expected = {i: summarize({"text": SOURCES[1], "adapter": i, "max_new_tokens": 12}).json()["summary"]
                for i in ids}
    # More adapters than a replica holds, concurrently: loads and evictions interleave with batches.
    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(lambda i: (i, summarize({"text": SOURCES[1], "adapter": i, "max_new_tokens": 12})),
                            ids * 8))
    for adapter, r in got:
        assert r.status_code == 200 and r.json()["summary"] == expected[adapter]


BAD = [
    ({"text": "x", "adapter": "no-such-adapter"}, 404, "unknown adapter"),
    ({"text": "x", "adapter": "../../etc/passwd"}, 400, "adapter id"),
    ({"text": "x", "adapter": "a/b"}, 400, "adapter id"),
    ({"text": ""}, 422, "empty"),
    ({"text": "   "}, 422, "empty"),
    ({"text": []}, 422, "non-empty"),
    ({"text": ["ok", ""]}, 422, "text[1] is empty"),
    ({"text": "x" * 100_000}, 413, "limit"),
    ({"text": 5}, 422, "text"),
    ({"text": ["a", 3]}, 422, "text"),
    ({"text": "x", "max_new_tokens": -1}, 422, "max_new_tokens"),
    ({"text": "x", "max_new_tokens": 0}, 422, "max_new_tokens"),
    ({"text": "x", "max_new_tokens": 10**9}, 422, "max_new_tokens"),
    ({"text": "x", "max_new_tokens": "5"}, 422, "max_new_tokens"),
    ({"text": "x", "adapter": 7}, 422, "adapter"),
    ({"txt": "x"}, 422, "text"),
    ([1, 2], 422, "body"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD)
def test_bad_requests_get_4xx_and_server_keeps_serving(server, body, status, message):
    r = summarize(body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert summarize({"text": SOURCES[0], "max_new_tokens": 4}).status_code == 200


def test_malformed_json(server):
    r = requests.post(f"{URL}/v1/summarize", data="{not json", timeout=10)
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    assert summarize({"text": SOURCES[0], "max_new_tokens": 4}).status_code == 200
