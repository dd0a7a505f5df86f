"""The served app for real: `serve run` on its own local Ray instance and a free port, HTTP
requests against a copy of the sweep's registry. Native API, request guards, registry changes,
backpressure and metrics here; the OpenAI-compatible API in test_openai_api.py (same server).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml

from qlora_ray.serving import guards
from qlora_ray.serving.settings import ServeSettings
from tests.conftest import ROOT

SOURCES = [
    "def add(a, b):\n    return a + b",
    "def read_lines(path):\n    with open(path) as f:\n        return f.read().splitlines()",
    "class Stack:\n    def __init__(self):\n        self.items = []\n"
    "    def push(self, x):\n        self.items.append(x)",
    "def is_empty(self):\n    return len(self._queue) == 0",
]
# Small queues so that backpressure is reachable; the rest as shipped.
SERVE_ARGS = {"max_adapters_per_replica": 2, "max_batch_size": 4, "max_queued_requests": 16}

# `serve run` on a Ray instance of its own (address "local": never another session's), with a
# known metrics port and the GPUs Ray detects, or as many as asked for (test_multi_gpu declares 2 on
# a CPU machine: only a resource, the replicas still run on the CPU). SIGINT shuts Serve down, and
# Ray with it: this process started it.
LAUNCH = """
import json, sys, ray
from ray.serve.scripts import cli
ray.init(address="local", namespace="serve", include_dashboard=False, num_cpus=4, num_gpus=json.loads(sys.argv[3]),
         _metrics_export_port=int(sys.argv[2]))
cli.main(["run", sys.argv[1]], prog_name="serve")
"""


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class ServeApp:
    """`serve run` of the project's app (import path serve:build) in a subprocess."""

    def __init__(self, registry: Path, workdir: Path, args: dict, *, num_gpus: int | None = None):
        self.registry, self.workdir, self.args, self.num_gpus = registry, workdir, args, num_gpus
        self.port, self.metrics_port = free_ports(2)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "serve.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 300) -> None:
        config = {
            "proxy_location": "HeadOnly",
            "http_options": {"host": "127.0.0.1", "port": self.port},
            "applications": [{"name": "qlora", "route_prefix": "/", "import_path": "serve:build",
                              "args": {"registry": str(self.registry), **self.args}}],
        }
        path = self.workdir / "serve.yaml"
        path.write_text(yaml.safe_dump(config))
        env = dict(os.environ, RAY_DEDUP_LOGS="0")
        with open(self.log, "w") as log:
            launch = [sys.executable, "-c", LAUNCH, str(path), str(self.metrics_port), json.dumps(self.num_gpus)]
            self.proc = subprocess.Popen(launch, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve run exited:\n{self.tail()}")
            try:
                if requests.get(f"{self.url}/healthz", timeout=5).status_code == 200:
                    return
            except requests.RequestException:  # not listening yet
                pass
            time.sleep(2)
        self.stop()
        raise RuntimeError(f"serve run did not become healthy:\n{self.tail()}")

    def stop(self) -> None:
        """SIGINT (Serve and the Ray instance shut down), then the process group, by its id only."""
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)  # what Ray left behind in the group, if anything
            except ProcessLookupError:
                break
            time.sleep(5)
        proc.wait(timeout=30)

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def index(self) -> dict:
        return json.loads((self.registry / "index.json").read_text())

    def write_index(self, index: dict) -> None:
        tmp = self.registry / ".index.json.test-tmp"
        tmp.write_text(json.dumps(index, indent=2))
        os.replace(tmp, self.registry / "index.json")


_SHARED: dict = {}


@pytest.fixture(scope="session")
def server(sweep, tmp_path_factory) -> ServeApp:
    """One server per session: test_openai_api.py imports this fixture, and the second
    instance pytest makes of it finds the first one's server here."""
    if "app" not in _SHARED:
        workdir = tmp_path_factory.mktemp("serve")
        registry = workdir / "registry"
        shutil.copytree(sweep["out"] / "registry", registry)  # tests change it; the sweep's stays
        app = ServeApp(registry, workdir, SERVE_ARGS)
        app.start()
        _SHARED.update(app=app, users=0)
    _SHARED["users"] += 1
    try:
        yield _SHARED["app"]
    finally:
        _SHARED["users"] -= 1
        if _SHARED["users"] == 0:
            _SHARED.pop("app").stop()


def summarize(server: ServeApp, body, **kw) -> requests.Response:
    return requests.post(f"{server.url}/v1/summarize", json=body, timeout=120, **kw)


def post_raw(server: ServeApp, path: str, data: bytes | str, content_type: str | None = "application/json",
             **kw) -> requests.Response:
    headers = kw.pop("headers", {})
    if content_type is not None:
        headers["Content-Type"] = content_type
    return requests.post(f"{server.url}{path}", data=data, headers=headers, timeout=60, **kw)


def assert_serving(server: ServeApp) -> None:
    r = summarize(server, {"text": SOURCES[0], "max_new_tokens": 4})
    assert r.status_code == 200, r.text


def strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in strings(k) + strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return []


class registered_adapter:
    """A context manager: an adapter directory added to the registry's index, removed after."""

    def __init__(self, server: ServeApp, adapter_id: str, *, weights: bytes | None = None, config: dict | None = None):
        self.server, self.id, self.weights, self.config = server, adapter_id, weights, config

    def __enter__(self) -> str:
        index = self.server.index()
        source = self.server.registry / index["default"]
        target = self.server.registry / self.id
        shutil.copytree(source, target)
        if self.weights is not None:
            (target / "adapter_model.safetensors").write_bytes(self.weights)
        if self.config is not None:
            config = json.loads((target / "adapter_config.json").read_text())
            (target / "adapter_config.json").write_text(json.dumps(config | self.config))
        entry = dict(next(a for a in index["adapters"] if a["id"] == index["default"]), id=self.id)
        index["adapters"].append(entry)
        self.server.write_index(index)
        return self.id

    def __exit__(self, *exc) -> None:
        index = self.server.index()
        index["adapters"] = [a for a in index["adapters"] if a["id"] != self.id]
        self.server.write_index(index)
        shutil.rmtree(self.server.registry / self.id, ignore_errors=True)


def wait_for(predicate, timeout_s: float = 20, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.5)


# ---------------------------------------------------------------------------------------------
# The native API


def test_healthz(server):
    r = requests.get(f"{server.url}/healthz", timeout=10)
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_lists_adapters(server):
    index = server.index()
    body = requests.get(f"{server.url}/v1/adapters", timeout=30).json()
    assert body["default"] == index["default"]
    assert [a["id"] for a in body["adapters"]] == [a["id"] for a in index["adapters"]]
    assert all("metrics" in a and "hyperparameters" in a for a in body["adapters"])
    assert all(a["status"] == "ready" and "reason" not in a for a in body["adapters"]), body["adapters"]


def test_listing_shows_no_local_paths(server):
    body = requests.get(f"{server.url}/v1/adapters", timeout=30).json()
    assert body["base_model"] == Path(server.index()["base_model"]).name
    leaked = [s for s in strings(body) if s.startswith("/") or str(server.registry.parent) in s]
    assert not leaked, leaked


def test_stats_pass_the_replica_status_through(server):
    summarize(server, {"text": SOURCES[0], "max_new_tokens": 4})
    body = requests.get(f"{server.url}/v1/stats", timeout=30).json()
    assert {"resident", "rejected", "loads"} <= set(body), body
    assert server.index()["default"] in body["resident"]


def test_default_and_second_adapter_differ(server):
    index = server.index()
    first = summarize(server, {"text": SOURCES, "max_new_tokens": 16})
    assert first.status_code == 200, first.text
    assert first.json()["adapter"] == index["default"]
    default_out = first.json()["summary"]
    assert isinstance(default_out, list) and len(default_out) == len(SOURCES)
    others = [a["id"] for a in index["adapters"] if a["id"] != index["default"]]
    outs = {}
    for adapter in others:
        r = summarize(server, {"text": SOURCES, "adapter": adapter, "max_new_tokens": 16})
        assert r.status_code == 200 and r.json()["adapter"] == adapter, r.text
        outs[adapter] = r.json()["summary"]
    assert any(out != default_out for out in outs.values()), (default_out, outs)
    # Same adapter, same input, same output: greedy, and no other adapter leaked in
    # (three adapters cycled through a replica that holds two).
    again = summarize(server, {"text": SOURCES, "max_new_tokens": 16}).json()["summary"]
    assert again == default_out


def test_single_text_in_single_text_out(server):
    r = summarize(server, {"text": SOURCES[0], "max_new_tokens": 4})
    assert r.status_code == 200 and isinstance(r.json()["summary"], str)
    r = summarize(server, {"text": SOURCES[0], "adapter": None, "max_new_tokens": 4})  # null: the default
    assert r.status_code == 200 and r.json()["adapter"] == server.index()["default"]


def test_concurrent_requests_for_different_adapters(server):
    ids = [a["id"] for a in server.index()["adapters"]]
    expected = {i: summarize(server, {"text": SOURCES[1], "adapter": i, "max_new_tokens": 12}).json()["summary"]
                for i in ids}
    # More adapters than a replica holds, concurrently: loads and evictions interleave with batches.
    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(lambda i: (i, summarize(server, {"text": SOURCES[1], "adapter": i,
                                                             "max_new_tokens": 12})), ids * 8))
    for adapter, r in got:
        assert r.status_code == 200 and r.json()["summary"] == expected[adapter], r.text


BAD = [
    ({"text": "x", "adapter": "no-such-adapter"}, 404, "unknown adapter"),
    ({"text": "x", "adapter": "../../etc/passwd"}, 400, "adapter id"),
    ({"text": "x", "adapter": "a/b"}, 400, "adapter id"),
    ({"text": "x", "adapter": "A" * 10_000}, 400, "adapter id"),
    ({"text": "x", "adapter": ""}, 422, "adapter must not be empty"),
    ({"text": ""}, 422, "empty"),
    ({"text": "   "}, 422, "empty"),
    ({"text": "\u200b\u200c\u200d\u2060\ufeff"}, 422, "empty"),  # zero-width only
    ({"text": "\x00\x00"}, 422, "empty"),
    ({"text": "\x01\x1b\x7f\x85\n\t\r"}, 422, "empty"),  # controls only
    ({"text": "\u0301\u0308"}, 422, "empty"),  # combining marks with nothing to combine with
    ({"text": "\u3164\u2800"}, 422, "empty"),  # Hangul filler, blank Braille
    ({"text": []}, 422, "non-empty"),
    ({"text": ["ok", ""]}, 422, "text[1] is empty"),
    ({"text": "x" * 100_000}, 413, "limit"),
    ({"text": ["x"] * 33}, 413, "at most"),
    ({"text": 5}, 422, "text"),
    ({"text": None}, 422, "text"),
    ({"text": ["a", 3]}, 422, "text"),
    ({"text": {"a": "b"}}, 422, "text"),
    ({"text": "x", "max_new_tokens": -1}, 422, "max_new_tokens"),
    ({"text": "x", "max_new_tokens": 0}, 422, "max_new_tokens"),
    ({"text": "x", "max_new_tokens": 10**9}, 422, "max_new_tokens"),
    ({"text": "x", "max_new_tokens": 10**4000}, 422, "max_new_tokens"),
    ({"text": "x", "max_new_tokens": "5"}, 422, "max_new_tokens"),
    ({"text": "x", "max_new_tokens": 5.0}, 422, "max_new_tokens"),
    ({"text": "x", "max_new_tokens": True}, 422, "max_new_tokens"),
    ({"text": "x", "adapter": 7}, 422, "adapter"),
    ({"txt": "x"}, 422, "text"),
    ({"text": "x", "extra": 1}, 422, "extra"),
    ([1, 2], 422, "body"),
    ("text", 422, "body"),
]


@pytest.mark.parametrize(("body", "status", "message"), BAD)
def test_bad_requests_get_4xx_and_server_keeps_serving(server, body, status, message):
    r = summarize(server, body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert len(r.text) < 2000  # a client's huge value is not echoed back
    assert_serving(server)


# Bodies that are not strict JSON, or that break naive parsers: 400/422 JSON, never a 500.
RAW = [
    (b"{not json", 400, "JSON"),
    (b"", 400, "JSON"),
    (b'{"text": "x"', 400, "JSON"),
    (b'{"text": "\xff\xfe"}', 400, "UTF-8"),
    (b'\xef\xbb\xbf{"text": "x"}', 400, "JSON"),  # a BOM
    (b'{"text": "x", "max_new_tokens": ' + b"9" * 5000 + b"}", 400, "out of range"),
    (b'{"text": "x", "max_new_tokens": NaN}', 400, "NaN"),
    (b'{"text": "x", "max_new_tokens": Infinity}', 400, "Infinity"),
    (b'{"text": "x", "max_new_tokens": -Infinity}', 400, "Infinity"),
    (b'{"text": "x", "max_new_tokens": 1e999}', 400, "out of range"),
    (b'{"text": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "nested"),
    (b'{"text": "\\ud800"}', 422, "surrogate"),
    (b'{"text": ["ok", "a\\udfffb"]}', 422, "text[1] contains an unpaired surrogate"),
    (b'{"text": "x", "\\ud800": 1}', 422, "body"),  # an unknown field whose name cannot be encoded
    (b"null", 422, "body"),
    (b'{"text": "x", "adapter": "\\ud800"}', 400, "adapter id"),
]


@pytest.mark.parametrize(("data", "status", "message"), RAW, ids=[str(i) for i in range(len(RAW))])
def test_bodies_that_break_parsers(server, data, status, message):
    r = post_raw(server, "/v1/summarize", data)
    assert r.status_code == status, r.text
    assert message in r.json()["error"], r.text
    assert_serving(server)


def test_malformed_json(server):
    r = post_raw(server, "/v1/summarize", "{not json")
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    assert_serving(server)


# ---------------------------------------------------------------------------------------------
# Guards: body size, content type, Host, Origin


def test_body_over_the_limit_by_content_length(server):
    limit = ServeSettings().max_body_bytes
    body = json.dumps({"text": "x" * limit}).encode()
    r = post_raw(server, "/v1/summarize", body)
    assert r.status_code == 413 and "larger than" in r.json()["error"], r.text
    r = post_raw(server, "/v1/completions", body)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", r.text
    assert_serving(server)


def test_body_over_the_limit_without_content_length(server):
    limit = ServeSettings().max_body_bytes

    def chunks():  # chunked transfer encoding: counted as it arrives
        yield b'{"text": "'
        for _ in range(limit // 65536 + 2):
            yield b"x" * 65536
        yield b'"}'

    r = post_raw(server, "/v1/summarize", chunks())
    assert r.status_code == 413, r.text
    assert_serving(server)


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/json; charset=latin-1",
                                          "application/jsonx"])
def test_post_needs_json_content_type(server, content_type):
    body = json.dumps({"text": SOURCES[0], "max_new_tokens": 4})
    r = post_raw(server, "/v1/summarize", body, content_type=content_type)
    assert r.status_code == 415 and "application/json" in r.json()["error"], r.text
    r = post_raw(server, "/v1/completions", body, content_type=content_type)
    assert r.status_code == 415 and r.json()["error"]["type"] == "invalid_request_error", r.text


def test_json_content_type_with_utf8_charset(server):
    body = json.dumps({"text": SOURCES[0], "max_new_tokens": 4})
    assert post_raw(server, "/v1/summarize", body, content_type="Application/JSON; charset=UTF-8").status_code == 200


@pytest.mark.parametrize(("host", "status"), [("evil.example", 400), ("evil.example:8000", 400),
                                              ("localhost.evil.example", 400), ("127.0.0.1.nip.io", 400),
                                              ("localhost", 200), ("localhost:1234", 200), ("LOCALHOST.", 200),
                                              ("[::1]:8000", 200), ("127.0.0.1", 200)])
def test_host_header_must_be_allowed(server, host, status):
    r = requests.get(f"{server.url}/v1/adapters", headers={"Host": host}, timeout=30)
    assert r.status_code == status, r.text
    r = post_raw(server, "/v1/summarize", json.dumps({"text": SOURCES[0], "max_new_tokens": 4}),
                 headers={"Host": host})
    assert r.status_code == status, r.text
    if status == 400:
        assert "Host" in r.json()["error"]


@pytest.mark.parametrize("origin", ["http://evil.example", "null", "http://localhost:3000"])
def test_cross_origin_requests_are_refused(server, origin):
    r = post_raw(server, "/v1/summarize", json.dumps({"text": SOURCES[0]}), headers={"Origin": origin})
    assert r.status_code == 403 and "Origin" in r.json()["error"], r.text
    r = requests.get(f"{server.url}/v1/models", headers={"Origin": origin}, timeout=30)
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed", r.text
    # A CORS preflight is never approved.
    r = requests.options(f"{server.url}/v1/completions", timeout=30,
                         headers={"Origin": origin, "Access-Control-Request-Method": "POST"})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers


def test_unknown_routes_and_methods_answer_json(server):
    r = requests.get(f"{server.url}/nope", timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    r = requests.get(f"{server.url}/v1/summarize", timeout=30)
    assert r.status_code == 405 and "error" in r.json()
    r = requests.get(f"{server.url}/docs", timeout=30)
    assert r.status_code == 404


# ---------------------------------------------------------------------------------------------
# The registry, read again when it changes; adapters that fail validation


def test_registry_changes_are_seen_without_restart(server):
    with registered_adapter(server, "copied-adapter") as adapter_id:
        wait_for(lambda: any(a["id"] == adapter_id for a in
                             requests.get(f"{server.url}/v1/adapters", timeout=30).json()["adapters"]),
                 what="the new adapter in the listing")
        r = wait_for(lambda: (r := summarize(server, {"text": SOURCES[0], "adapter": adapter_id,
                                                      "max_new_tokens": 4})).status_code == 200 and r,
                     what="a summary from the new adapter")
        assert r.json()["adapter"] == adapter_id
    wait_for(lambda: summarize(server, {"text": "x", "adapter": adapter_id}).status_code == 404,
             what="the removed adapter to be unknown")
    assert_serving(server)


def qlora_ray_cli(server: ServeApp, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qlora_ray.registry_cli", "--registry", str(server.registry), *args],
                          capture_output=True, text=True, timeout=120)


def test_registry_import_promote_remove_are_seen_live(server, tmp_path):
    """The `qlora-ray` command against a running server: no restart, every change seen within seconds."""
    index = server.index()
    default, other = index["default"], index["adapters"][1]["id"]
    external = tmp_path / "trained-elsewhere"  # a PEFT adapter directory from outside the registry
    external.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(server.registry / other / name, external / name)

    def listing():
        return requests.get(f"{server.url}/v1/adapters", timeout=30).json()

    proc = qlora_ray_cli(server, "import", str(external), "--id", "imported-live")
    assert proc.returncode == 0, proc.stderr
    entry = wait_for(lambda: next((a for a in listing()["adapters"] if a["id"] == "imported-live"), None),
                     what="the imported adapter in the listing")
    assert entry["status"] == "ready"
    r = summarize(server, {"text": SOURCES[0], "adapter": "imported-live", "max_new_tokens": 8})
    expected = summarize(server, {"text": SOURCES[0], "adapter": other, "max_new_tokens": 8})
    assert r.status_code == 200 and r.json()["summary"] == expected.json()["summary"]  # the same weights

    assert qlora_ray_cli(server, "promote", "imported-live").returncode == 0
    wait_for(lambda: listing()["default"] == "imported-live", what="the promoted default")
    r = wait_for(lambda: (r := summarize(server, {"text": SOURCES[0], "max_new_tokens": 8})).json().get("adapter")
                 == "imported-live" and r, what="requests without an adapter to use the new default")
    assert r.status_code == 200

    proc = qlora_ray_cli(server, "remove", "imported-live", "--yes")
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: summarize(server, {"text": "x", "adapter": "imported-live"}).status_code == 404,
             what="the removed adapter to be unknown")
    assert listing()["default"] == default  # the best remaining by the metric
    assert summarize(server, {"text": SOURCES[0], "max_new_tokens": 4}).json()["adapter"] == default


def damaged(server: ServeApp, how: str) -> dict:
    weights = (server.registry / server.index()["default"] / "adapter_model.safetensors").read_bytes()
    config = json.loads((server.registry / server.index()["default"] / "adapter_config.json").read_text())
    return {"header": {"weights": b"\x08\x00\x00\x00\x00\x00\x00\x00{not json"},
            "truncated": {"weights": weights[: len(weights) * 2 // 3]},
            "rank": {"config": {"r": config["r"] * 2}}}[how]


@pytest.mark.parametrize("how", ["header", "truncated", "rank"])
def test_rejected_adapter_is_listed_with_its_reason_and_refused(server, how):
    adapter_id = f"broken-{how}"
    with registered_adapter(server, adapter_id, **damaged(server, how)):
        def listed():
            body = requests.get(f"{server.url}/v1/adapters", timeout=30).json()
            return next((a for a in body["adapters"] if a["id"] == adapter_id), None)

        entry = wait_for(listed, what="the broken adapter in the listing")
        assert entry["status"] == "rejected" and entry["reason"], entry
        assert str(server.registry) not in entry["reason"]
        for _ in range(2):  # never a 200, not even after a first failure
            r = summarize(server, {"text": SOURCES[0], "adapter": adapter_id})
            assert r.status_code == 422 and "rejected" in r.json()["error"], r.text
        # The others are fine.
        assert all(a["status"] == "ready" for a in requests.get(f"{server.url}/v1/adapters", timeout=30)
                   .json()["adapters"] if not a["id"].startswith("broken-"))
    assert_serving(server)


# ---------------------------------------------------------------------------------------------
# Backpressure and metrics


def test_full_queues_answer_503_with_retry_after(server):
    body = {"model": server.index()["default"], "prompt": SOURCES[1], "max_tokens": 64, "ignore_eos": True,
            "temperature": 0}

    def call(_):
        return requests.post(f"{server.url}/v1/completions", json=body, timeout=300)

    with ThreadPoolExecutor(64) as pool:
        got = list(pool.map(call, range(64)))
    codes = sorted({r.status_code for r in got})
    assert set(codes) <= {200, 503}, [r.text for r in got if r.status_code not in (200, 503)][:3]
    busy = [r for r in got if r.status_code == 503]
    assert busy, f"no request was refused: {codes}"
    assert all(int(r.headers["Retry-After"]) >= 1 for r in busy)
    assert all(r.json()["error"]["type"] == "server_error" for r in busy)
    assert any(r.status_code == 200 for r in got)
    assert_serving(server)


def test_per_adapter_metrics_are_exported(server):
    index = server.index()
    base_id = Path(index["base_model"]).name
    summarize(server, {"text": SOURCES[0], "max_new_tokens": 4})
    requests.post(f"{server.url}/v1/completions", timeout=60,
                  json={"model": base_id, "prompt": SOURCES[0], "max_tokens": 4, "ignore_eos": True})
    summarize(server, {"text": "x", "adapter": "no-such-adapter"})

    def exported():
        text = requests.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).text
        lines = [line for line in text.splitlines() if line.startswith("ray_qlora_ray_")]
        want = [("ray_qlora_ray_requests", f'adapter="{index["default"]}"'),
                ("ray_qlora_ray_requests", f'adapter="{base_id}"'),
                ("ray_qlora_ray_request_errors", 'code="404"'),
                ("ray_qlora_ray_request_latency_ms_bucket", f'adapter="{index["default"]}"'),
                ("ray_qlora_ray_generated_tokens", f'adapter="{base_id}"')]
        return all(any(line.startswith(name) and tag in line for line in lines) for name, tag in want)

    wait_for(exported, timeout_s=90, what="the ingress metrics on the Prometheus endpoint")


# ---------------------------------------------------------------------------------------------
# Guard helpers (no server)


@pytest.mark.parametrize(("raw", "message"), [
    (b"\xff", "UTF-8"), (b"", "empty"), (b"[1,", "JSON"), (b"NaN", "NaN"), (b"[Infinity]", "Infinity"),
    (b"1e400", "out of range"), (b"9" * 5000, "out of range"), (b"[" * 50_000 + b"]" * 50_000, "nested"),
])
def test_parse_json_rejects(raw, message):
    with pytest.raises(guards.ApiError) as e:
        guards.parse_json(raw)
    assert e.value.status == 400 and message in e.value.message


def test_parse_json_accepts_strict_json():
    assert guards.parse_json(b'{"a": [1, 2.5, "\\u00e9", null, true]}') == {"a": [1, 2.5, "é", None, True]}


@pytest.mark.parametrize(("text", "kind"), [
    ("ok", None), (" \u00e9 ", None), ("a\x00b", None), ("\U0001f600", None), ("\u200b", "empty"),
    ("\x00", "empty"), ("\u2028\u2029", "empty"), ("\ud800", "surrogate"), ("ab\udc00", "surrogate"),
    ("x" * 11, "too_long"), (5, "type"),
])
def test_text_problem(text, kind):
    problem = guards.text_problem(text, "text", 10)
    assert (problem.kind if problem else None) == kind


@pytest.mark.parametrize(("host", "allowed", "ok"), [
    ("localhost:8000", "localhost", True), ("LocalHost", "localhost", True), ("[::1]:80", "[::1]", True),
    ("::1", "[::1]", False), ("evil.example", "localhost", False), (None, "localhost", False),
    ("a.example.com", "*.example.com", True), ("example.com.evil", "*.example.com", False),
    ("anything", "*", True), ("localhost:80:80", "localhost", False), ("localhost:http", "localhost", False),
])
def test_host_allowed(host, allowed, ok):
    assert guards.host_allowed(host, guards._split(allowed)) is ok


def test_origin_and_content_type_checks():
    allowed = guards._split("https://app.example.com, http://localhost:3000")
    assert guards.origin_allowed("https://app.example.com", allowed)
    assert guards.origin_allowed("HTTP://LOCALHOST:3000/", allowed)
    assert not guards.origin_allowed("https://app.example.com.evil", allowed)
    assert not guards.origin_allowed("null", allowed)
    assert guards.is_json_content_type("application/json")
    assert guards.is_json_content_type("application/json;charset=utf-8")
    assert not guards.is_json_content_type("application/json; charset=utf-16")
    assert not guards.is_json_content_type("text/plain")
    assert not guards.is_json_content_type(None)


def test_paths_are_cut_to_their_last_component():
    assert guards.hide_paths("/home/me/models/t5-small") == "t5-small"
    assert guards.hide_paths("google/flan-t5-base") == "google/flan-t5-base"  # a hub id, not a path
    assert guards.hide_paths("no adapter_model.safetensors in /srv/reg/x-1") == "no adapter_model.safetensors in x-1"
    assert guards.hide_paths("see https://example.com/a/b") == "see https://example.com/a/b"
    assert guards.hide_paths("no chat format: use /v1/completions") == "no chat format: use /v1/completions"  # a route
    listing = guards.public({"base_model": "/data/base", "hp": {"dataset": "/home/u/d.jsonl"}, "n": 1}, False)
    assert listing == {"base_model": "base", "hp": {"dataset": "d.jsonl"}, "n": 1}
    assert guards.public({"p": "/a/b"}, True) == {"p": "/a/b"}
