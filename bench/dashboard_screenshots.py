"""Screenshots of the Ray dashboard during a real sweep and while serving, for the README.

    apt-get install -y chromium          # Debian's Chromium, at /usr/bin/chromium
    python bench/dashboard_screenshots.py                  # writes docs/dashboard/*.png

What it does, in one bounded command (about 3 to 4 minutes on 2 CPU cores, once the embedded
model is built; `--out DIR` writes elsewhere):

1. Starts a small real sweep with the project's CLI (`experiments/tune_t5.py`: its own local
   Ray, the embedded tiny T5, `--sweep-args`) in a process group of its own, reads the
   dashboard address it prints, waits until two trials run and, while they do, screenshots the
   sweep's job (its run_trial actors' progress), the Actors page (the trial actors) and the
   Cluster page (the trials' worker processes and their CPU); then lets the sweep finish.
2. Starts `serve run` of the project's app (`serve:build`) on the registry that sweep wrote,
   on a Ray instance of its own (address "local"; dashboard and dashboard agent on free
   loopback ports) and a free loopback HTTP port, sends summarize requests to every adapter,
   waits until the dashboard reports the application RUNNING and its deployments HEALTHY, and
   screenshots the Serve page, the application's page and the model replica's page with its
   log (the adapters loaded into slots and the requests' generate calls).

Token authentication (on by default in Ray >= 2.60): the dashboard's HTTP API takes the
cluster token as `Authorization: Bearer <token>`; the web page keeps it in an HttpOnly
cookie, `ray-authentication-token`, that `POST /api/authenticate` (the dashboard's own login
endpoint, which its token dialog calls) sets after checking the token. The script reads the
token the clusters use with `ray get-auth-token` (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token) and makes that call from inside the headless browser's page, so the
browser holds the cookie the way it would after a person pasted the token into the dialog;
the token is never written to disk or printed. A page that opens a dialog (the token dialog)
instead of rendering fails the run.

Chromium is driven over the DevTools protocol (aiohttp's websocket client, installed with
Ray): no Node.js or Playwright needed. Everything started here (the sweep, Serve, the browser)
runs in a process group of its own and is stopped by that group's id, also on errors, Ctrl-C
and SIGTERM; on an error the logs are kept and their directory printed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWEEP_ARGS = ("--num-samples 6 --max-steps 120 --eval-every 20 --eval-size 24 --train-size 400 "
              "--max-concurrent-trials 2 --top-k 3")
SOURCES = [
    "def add(a, b):\n    return a + b",
    "def read_lines(path):\n    with open(path) as f:\n        return f.read().splitlines()",
    "class Stack:\n    def __init__(self):\n        self.items = []\n"
    "    def push(self, x):\n        self.items.append(x)",
    "def is_empty(self):\n    return len(self._queue) == 0",
]
# `serve run` on a Ray instance of its own, with its dashboard on a known loopback port.
# SIGINT shuts Serve down, and Ray with it: this process started it.
# The node's dashboard agent gets a free port too (ray.init has no argument for it; its default,
# 52365, is held by any other Ray instance on the machine): it serves the logs the pages show.
SERVE_LAUNCH = """
import sys, ray
from ray._private import parameter
from ray.serve.scripts import cli
init = parameter.RayParams.__init__
def with_agent_port(self, *args, **kwargs):
    kwargs.setdefault("dashboard_agent_listen_port", int(sys.argv[3]))
    init(self, *args, **kwargs)
parameter.RayParams.__init__ = with_agent_port
ray.init(address="local", namespace="serve", include_dashboard=True, dashboard_host="127.0.0.1",
         dashboard_port=int(sys.argv[2]), num_cpus=4)
cli.main(["run", sys.argv[1]], prog_name="serve")
"""
# The page has rendered when it shows `text` and no progress indicator or dialog (the token dialog).
READY_JS = """(() => {
  const body = document.body ? document.body.innerText : "";
  const busy = document.querySelector('[role="progressbar"], .MuiCircularProgress-root, .MuiLinearProgress-root');
  const dialog = document.querySelector('[role="dialog"]');
  return JSON.stringify({has: body.includes(%s), busy: !!busy, dialog: dialog ? dialog.innerText.slice(0, 200) : null});
})()"""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- processes


class Group:
    """A subprocess in a process group (session) of its own, stopped by that group's id only."""

    def __init__(self, name: str, argv: list[str], logfile: Path, **kw):
        self.name, self.logfile = name, logfile
        with open(logfile, "w") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **kw)
        self.pgid = self.proc.pid  # start_new_session: the child leads a new group with its pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def text(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""

    def tail(self, n: int = 3000) -> str:
        return self.text()[-n:]

    def stop(self, first: int = signal.SIGINT, grace_s: float = 60) -> None:
        """`first` to the leader (a clean shutdown), then SIGTERM and SIGKILL to the whole group."""
        if self.alive():
            try:
                self.proc.send_signal(first)
                self.proc.wait(timeout=grace_s)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.pgid, sig)  # whatever it left behind in its group
            except ProcessLookupError:
                break
            time.sleep(3)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


# ---------------------------------------------------------------- the dashboard's HTTP API


class Dashboard:
    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.token: str | None = None

    def get(self, path: str, timeout: float = 10):
        req = urllib.request.Request(self.url + path)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def wait_up(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.get("/api/authentication_mode")  # public: answers without a token
                return
            except (urllib.error.URLError, OSError, ValueError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the dashboard at {self.url} does not answer") from None
                time.sleep(1)

    def load_token(self, env: dict) -> None:
        """The token this cluster checks, when token authentication is on (else None)."""
        mode = self.get("/api/authentication_mode")["authentication_mode"]
        if mode != "token":
            log(f"dashboard authentication mode: {mode}")
            self.token = None
            return
        ray_cli = Path(sys.executable).with_name("ray")
        argv = [str(ray_cli)] if ray_cli.exists() else [sys.executable, "-m", "ray.scripts.scripts"]
        proc = subprocess.run([*argv, "get-auth-token"], env=env, capture_output=True, text=True, timeout=120)
        token = proc.stdout.strip().splitlines()[-1].strip() if proc.stdout.strip() else ""
        if proc.returncode != 0 or not token:
            raise RuntimeError(f"`ray get-auth-token` found no token: {proc.stderr[-500:]}")
        self.token = token
        self.get("/api/jobs/")  # raises (401/403) if it is not this cluster's token
        log("dashboard authentication mode: token (token from `ray get-auth-token`, accepted)")

    def actors(self) -> list[dict]:
        data = self.get("/api/v0/actors?limit=1000&detail=false")
        return data["data"]["result"]["result"]


# ---------------------------------------------------------------- headless Chromium over DevTools


class Browser:
    """Headless Chromium driven through the DevTools protocol (one page)."""

    FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", "--hide-scrollbars", "--remote-debugging-address=127.0.0.1",
             "--remote-debugging-port=0"]

    def __init__(self, executable: str, workdir: Path, width: int, height: int):
        self.width, self.height = width, height
        self.profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=workdir))  # new, empty profile
        self.group = Group("chromium", [executable, *self.FLAGS, f"--user-data-dir={self.profile}",
                                        f"--window-size={width},{height}", "about:blank"],
                           workdir / "chromium.log")
        self.loop = asyncio.new_event_loop()
        self.session = self.ws = None
        self.next_id = 0
        self.loop.run_until_complete(self._connect())

    async def _connect(self) -> None:
        import aiohttp

        active = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (active.exists() and len(active.read_text().splitlines()) >= 2):
            if not self.group.alive() or time.monotonic() > deadline:
                raise RuntimeError(f"Chromium did not start:\n{self.group.tail()}")
            await asyncio.sleep(0.2)
        port = int(active.read_text().splitlines()[0])
        self.session = aiohttp.ClientSession()
        async with self.session.get(f"http://127.0.0.1:{port}/json/list") as r:
            pages = [t for t in await r.json() if t["type"] == "page"]
        self.ws = await self.session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        await self._send("Page.enable")
        await self._send("Emulation.setDeviceMetricsOverride",
                         {"width": self.width, "height": self.height, "deviceScaleFactor": 1, "mobile": False})

    async def _send(self, method: str, params: dict | None = None, timeout_s: float = 60) -> dict:
        self.next_id += 1
        my_id = self.next_id
        await self.ws.send_json({"id": my_id, "method": method, "params": params or {}})
        deadline = time.monotonic() + timeout_s
        while True:
            msg = await self.ws.receive(timeout=max(0.1, deadline - time.monotonic()))
            if msg.type != 1:  # aiohttp.WSMsgType.TEXT
                raise RuntimeError(f"DevTools connection closed ({msg.type})")
            data = json.loads(msg.data)
            if data.get("id") == my_id:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error']}")
                return data.get("result", {})

    def send(self, method: str, params: dict | None = None) -> dict:
        return self.loop.run_until_complete(self._send(method, params))

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def goto(self, url: str) -> None:
        self.send("Page.navigate", {"url": url})

    def authenticate(self, dashboard: Dashboard) -> None:
        """What the dashboard's token dialog does: POST /api/authenticate with the token as a
        Bearer header, from the dashboard's own origin; the answer sets the HttpOnly cookie."""
        if dashboard.token is None:
            return
        self.goto(dashboard.url + "/api/authentication_mode")  # a public page of that origin
        time.sleep(1)
        status = self.evaluate(
            "fetch('/api/authenticate', {method: 'POST', credentials: 'same-origin', "
            f"headers: {{Authorization: 'Bearer ' + {json.dumps(dashboard.token)}}}}}).then(r => r.status)")
        if status != 200:
            raise RuntimeError(f"the dashboard refused the token: POST /api/authenticate answered {status}")
        cookies = self.send("Network.getCookies", {"urls": [dashboard.url + "/"]})["cookies"]
        if not any(c["name"] == "ray-authentication-token" and c["httpOnly"] for c in cookies):
            raise RuntimeError("POST /api/authenticate set no ray-authentication-token cookie")
        log("browser authenticated (HttpOnly cookie ray-authentication-token set by the dashboard)")

    def shoot(self, url: str, path: Path, expect: str, then: str | None = None, expect_after: str | None = None,
              timeout_s: float = 90, settle_s: float = 3) -> Path:
        """Open `url`, wait until the page shows `expect` and nothing is loading, run the script
        `then` (expand a section, scroll), wait for `expect_after`, and save a PNG."""
        self.goto(url)
        self._wait_for(url, expect, timeout_s)
        if then:
            time.sleep(settle_s)  # the first data re-renders the page: act on the settled one
            self.evaluate(then)
            self._wait_for(url, expect_after or expect, timeout_s)
        time.sleep(settle_s)  # charts and tables that fill in right after the first data
        path.write_bytes(self.png())
        log(f"wrote {path} ({path.stat().st_size // 1024} KB)")
        return path

    def _wait_for(self, url: str, expect: str, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        state: dict = {}
        while time.monotonic() < deadline:
            time.sleep(1)
            state = json.loads(self.evaluate(READY_JS % json.dumps(expect)) or "{}")
            if state.get("dialog"):
                raise RuntimeError(f"{url}: a dialog is open instead of the page: {state['dialog']!r}")
            if state.get("has") and not state.get("busy"):
                return
        failed = self.profile.parent / "not-rendered.png"
        failed.write_bytes(self.png())
        raise RuntimeError(f"{url}: did not finish rendering (looked for {expect!r}; state {state}; "
                           f"what it showed: {failed})")

    def png(self) -> bytes:
        return base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"])

    def close(self) -> None:
        try:
            if self.ws is not None:
                self.loop.run_until_complete(self.ws.close())
            if self.session is not None:
                self.loop.run_until_complete(self.session.close())
            self.loop.close()
        except BaseException:  # noqa: BLE001 - the browser is stopped below anyway
            pass
        finally:
            self.group.stop(first=signal.SIGTERM, grace_s=10)


def optimize_png(path: Path, max_bytes: int) -> None:
    """Above `max_bytes`: a lossless re-encode if that is small enough, else a 256-color palette
    (a flat UI, no visible loss). Chromium's own PNGs are kept where they are smaller."""
    if path.stat().st_size <= max_bytes:
        return
    try:
        from PIL import Image
    except ImportError:
        log(f"{path} is over {max_bytes // 1024} KB; install Pillow to compress it")
        return
    with Image.open(path) as img:
        img.load()
    for candidate in (img, img.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)):
        tmp = path.with_suffix(".tmp.png")
        candidate.save(tmp, optimize=True)
        if tmp.stat().st_size < path.stat().st_size:
            os.replace(tmp, path)
        else:
            tmp.unlink()
        if path.stat().st_size <= max_bytes:
            return


# ---------------------------------------------------------------- the two phases


def click_js(find: str) -> str:
    """A page script: click (as React sees it) every element that `find` (a JS expression
    giving an array of elements) returns."""
    return (f"(() => {{ const xs = ({find}); "
            "xs.forEach(e => e.dispatchEvent(new MouseEvent('click', {bubbles: true}))); return xs.length; })()")


def leaf_with_text(pattern: str) -> str:
    """A JS expression: elements without children whose text matches the JS regex `pattern`."""
    return f"[...document.querySelectorAll('p, span, h4, h5, h6, div')].filter(e => e.children.length === 0 " \
           f"&& /{pattern}/.test(e.textContent.trim()))"


def section_titles(pattern: str) -> str:
    """A JS expression: the titles (h4, an icon and the text) of foldable page sections."""
    return f"[...document.querySelectorAll('h4')].filter(e => /{pattern}/.test(e.textContent.trim()))"


def scroll_to_js(find: str, offset: int = 140) -> str:
    return f"(() => {{ const e = ({find})[0]; if (!e) return false; " \
           f"window.scrollTo(0, e.getBoundingClientRect().top + window.scrollY - {offset}); return true; }})()"


def sweep_shots(job_id: str) -> list[tuple]:
    """(file, route, text to wait for, page script to run then, text to wait for after it)."""
    # The job's page: expand "Ray Core Overview" (its chevron sits beside the "done / total"
    # count: the run_trial actors' tasks and evaluate_base appear) and fold the driver-log and
    # timeline sections, which have nothing to show for a script's own driver.
    expand = click_js(leaf_with_text(r"^\d+ \/ \d+$") + ".slice(0, 1).map(e => e.parentElement.querySelector('svg'))")
    fold = click_js(section_titles(r"^(Logs|Task Timeline \(beta\))$"))
    return [
        ("sweep-job.png", f"/#/jobs/{job_id}", "Ray Core Overview", f"{expand}; {fold}", "run_trial"),
        ("sweep-actors.png", "/#/actors", "ImplicitFunc", None, None),
        # The node and its worker processes: the trials' ray::ImplicitFunc.train with their CPU.
        ("sweep-cluster.png", "/#/cluster", "ray::ImplicitFunc", scroll_to_js(leaf_with_text(r"\(Head\)")), None),
    ]


def serve_shots(app: str, replica: str) -> list[tuple]:
    """Like sweep_shots: the Serve page (controller, proxy, the application and its deployments),
    the application's page, and the page of the model deployment's replica with its log
    (adapters loaded into slots, the generate calls of the requests sent)."""
    return [
        ("serve-overview.png", "/#/serve", "Deploying new app", None, None),  # with the controller's log
        ("serve-application.png", f"/#/serve/applications/{app}", "AdapterModel", None, None),
        ("serve-replica.png", f"/#/serve/applications/{app}/AdapterModel/{replica}", "CALL generate", None, None),
    ]


def running_trials(dash: Dashboard) -> int:
    """Trial actors (Tune's function trainables: class ImplicitFunc) alive, none being created."""
    try:
        trials = [a for a in dash.actors() if a.get("class_name") == "ImplicitFunc"]
    except (urllib.error.URLError, OSError, KeyError, ValueError):  # the state API not answering yet
        return 0
    if any(a.get("state") in ("PENDING_CREATION", "DEPENDENCIES_UNREADY", "RESTARTING") for a in trials):
        return 0
    return sum(a.get("state") == "ALIVE" for a in trials)


def sweep_phase(args, workdir: Path, browser_box: list, env: dict, started: list) -> Path:
    out = workdir / "runs"
    # --address local: a Ray instance of its own, never one that is already running here.
    argv = [sys.executable, str(ROOT / "experiments" / "tune_t5.py"), "--address", "local", "--output-dir", str(out),
            *shlex.split(args.sweep_args)]
    log("sweep: " + shlex.join(argv[1:]))
    sweep = Group("sweep", argv, workdir / "sweep.log", cwd=ROOT, env=env)
    started.append(sweep)

    deadline = time.monotonic() + args.start_timeout
    match = None
    while match is None:
        if not sweep.alive():
            raise RuntimeError(f"the sweep exited before it started Ray:\n{sweep.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no `Ray dashboard:` line from the sweep:\n{sweep.tail()}")
        match = re.search(r"Ray dashboard: (http://\S+)", sweep.text())
        time.sleep(1)
    dash = Dashboard(match.group(1))
    log(f"sweep dashboard: {dash.url}")
    dash.wait_up()
    dash.load_token(env)

    deadline = time.monotonic() + args.start_timeout
    while running_trials(dash) < args.min_trials:
        if not sweep.alive():
            raise RuntimeError(f"the sweep ended before trials could be shown:\n{sweep.tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no running trials after {args.start_timeout}s:\n{sweep.tail()}")
        time.sleep(2)
    log(f"sweep: {running_trials(dash)} trials running")
    jobs = dash.get("/api/jobs/")
    job = next((j for j in jobs if j.get("status") == "RUNNING" and "tune_t5.py" in (j.get("entrypoint") or "")),
               None) or next((j for j in jobs if j.get("status") == "RUNNING"), None)
    if job is None:
        raise RuntimeError(f"the sweep's job is not listed: {jobs}")
    job_id = job.get("job_id") or job.get("submission_id")

    if not browser_box:
        browser_box.append(Browser(args.chromium, workdir, args.width, args.height))
    browser = browser_box[0]
    browser.authenticate(dash)
    for name, route, expect, then, expect_after in sweep_shots(job_id):
        # ASHA stops trials early and the next one starts in a new actor: catch a moment when
        # `--min-trials` run, not one between trials (best effort, a few seconds).
        deadline = time.monotonic() + 20
        while running_trials(dash) < args.min_trials and time.monotonic() < deadline and sweep.alive():
            time.sleep(0.5)
        if not sweep.alive():
            raise RuntimeError(f"the sweep ended before {name}; make it longer with --sweep-args")
        args.written.append(browser.shoot(dash.url + route, args.out / name, expect, then, expect_after))

    log("sweep: screenshots taken; waiting for it to finish")
    try:
        rc = sweep.proc.wait(timeout=args.sweep_timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"the sweep did not finish in {args.sweep_timeout}s") from None
    if rc != 0:
        raise RuntimeError(f"the sweep failed (exit {rc}):\n{sweep.tail()}")
    sweep.stop()  # leftovers in its group, if any
    registry = out / "registry"
    if not (registry / "index.json").is_file():
        raise RuntimeError(f"the sweep wrote no registry at {registry}")
    log(f"sweep: finished; registry {registry}")
    return registry


def serve_phase(args, workdir: Path, registry: Path, browser_box: list, env: dict, started: list) -> None:
    import yaml

    http_port, dash_port, agent_port = free_port(), free_port(), free_port()
    config = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": http_port},
        "applications": [{"name": "qlora", "route_prefix": "/", "import_path": "serve:build",
                          "args": {"registry": str(registry)}}],
    }
    path = workdir / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    log(f"serve: app on http://127.0.0.1:{http_port}, dashboard on http://127.0.0.1:{dash_port}")
    server = Group("serve", [sys.executable, "-c", SERVE_LAUNCH, str(path), str(dash_port), str(agent_port)],
                   workdir / "serve.log", cwd=ROOT, env=env)
    started.append(server)
    url = f"http://127.0.0.1:{http_port}"

    deadline = time.monotonic() + args.start_timeout
    while True:
        if not server.alive():
            raise RuntimeError(f"serve run exited:\n{server.tail()}")
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=5) as r:
                if r.status == 200:
                    break
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"serve run did not become healthy:\n{server.tail()}")
        time.sleep(2)
    with urllib.request.urlopen(url + "/v1/adapters", timeout=30) as r:
        adapters = [a["id"] for a in json.loads(r.read())["adapters"]]

    def summarize(job: tuple[str, str]) -> int:
        adapter, text = job
        req = urllib.request.Request(url + "/v1/summarize", method="POST",
                                     data=json.dumps({"text": text, "adapter": adapter}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status

    jobs = [(a, s) for a in adapters for s in SOURCES]
    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(summarize, jobs))
    log(f"serve: {len(codes)} summarize requests over {len(adapters)} adapters, statuses {sorted(set(codes))}")

    dash = Dashboard(f"http://127.0.0.1:{dash_port}")
    dash.wait_up()
    dash.load_token(env)
    deadline = time.monotonic() + 120
    while True:
        app = dash.get("/api/serve/applications/").get("applications", {}).get("qlora", {})
        deployments = app.get("deployments", {})
        if app.get("status") == "RUNNING" and deployments and all(
                d.get("status") == "HEALTHY" for d in deployments.values()):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Serve app is not RUNNING/HEALTHY in the dashboard: {app}")
        time.sleep(2)
    log(f"serve: application RUNNING, deployments {sorted(deployments)} HEALTHY")

    if not browser_box:
        browser_box.append(Browser(args.chromium, workdir, args.width, args.height))
    browser = browser_box[0]
    browser.authenticate(dash)
    replica = deployments["AdapterModel"]["replicas"][0]["replica_id"]
    for name, route, expect, then, expect_after in serve_shots("qlora", replica):
        args.written.append(browser.shoot(dash.url + route, args.out / name, expect, then, expect_after))
    server.stop()
    log("serve: stopped")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs/dashboard"),
                   help="where the PNGs go (default docs/dashboard)")
    p.add_argument("--sweep-args", default=SWEEP_ARGS, help=f"flags for experiments/tune_t5.py (default: {SWEEP_ARGS})")
    p.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    p.add_argument("--width", type=int, default=1600)
    p.add_argument("--height", type=int, default=1000)
    p.add_argument("--max-kb", type=int, default=500,
                   help="PNGs larger than this are recompressed (losslessly, else to a 256-color palette)")
    p.add_argument("--min-trials", type=int, default=2, help="trials running for the sweep's screenshots")
    p.add_argument("--start-timeout", type=float, default=900,
                   help="seconds for Ray, the first trials and Serve to come up (the first run builds the model)")
    p.add_argument("--sweep-timeout", type=float, default=1800)
    p.add_argument("--skip-serve", action="store_true", help="only the sweep's screenshots")
    p.add_argument("--keep-workdir", action="store_true", help="keep the sweep output and logs (printed)")
    args = p.parse_args()
    if not Path(args.chromium).exists():
        print(f"error: no Chromium at {args.chromium}: apt-get install -y chromium (or pass --chromium)",
              file=sys.stderr)
        return 2
    args.out = args.out if args.out.is_absolute() else Path.cwd() / args.out
    args.out.mkdir(parents=True, exist_ok=True)

    workdir = Path(tempfile.mkdtemp(prefix="qlora-ray-dashboard-"))
    env = dict(os.environ, RAY_DEDUP_LOGS="0", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)  # both Ray instances are started here
    started: list[Group] = []
    browser_box: list[Browser] = []
    t0 = time.monotonic()

    def terminate(signum, frame):  # SIGTERM: unwind through the finally below
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminate)
    args.written = []  # PNGs, in the order taken
    try:
        registry = sweep_phase(args, workdir, browser_box, env, started)
        if not args.skip_serve:
            serve_phase(args, workdir, registry, browser_box, env, started)
        for path in args.written:
            optimize_png(path, args.max_kb * 1024)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except Exception as e:  # noqa: BLE001 - report, then clean up
        if not isinstance(e, RuntimeError):
            traceback.print_exc()
        log(f"error: {e}")
        log(f"logs kept in {workdir}")
        args.keep_workdir = True
        return 1
    finally:
        for b in browser_box:
            b.close()
        for g in reversed(started):
            g.stop()
        groups = [*started, *(b.group for b in browser_box)]
        if groups:
            log("stopped " + ", ".join(f"{g.name} (process group {g.pgid})" for g in groups))
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    kept = f"; sweep output and logs in {workdir}" if args.keep_workdir else ""
    log(f"done in {time.monotonic() - t0:.0f} s{kept}")
    for path in args.written:
        print(f"{path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}"
              f"  ({path.stat().st_size // 1024} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
