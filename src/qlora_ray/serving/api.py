"""The HTTP ingress (FastAPI on a Serve deployment): guards, the native API, the OpenAI-compatible
API (openai_api.py), calls to the model replicas, and per-adapter metrics.

    GET  /healthz         200 {"status": "ok"} once the model replicas answer
    GET  /v1/adapters     {"default", "base_model", "base_metrics", "adapters": [{"id", "metrics",
                          "hyperparameters", ..., "status": "ready" | "rejected", "reason"?}]}
    POST /v1/summarize    {"text": str | [str], "adapter"?: id, "max_new_tokens"?: int}
                          -> {"adapter": id, "summary": str | [str]}
    GET  /v1/stats        the model replica's status: resident and rejected adapters, load times
Native errors are JSON {"error": "..."}; the OpenAI routes use OpenAI's error envelope.
"""

# No `from __future__ import annotations`: Serve pickles the route methods of `Api` by value,
# and FastAPI must still resolve their annotations (`request: Request`) in the replica.

import asyncio
import logging
import math
import re
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, ValidationError
from ray import serve
from ray.serve import metrics
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException
from starlette.responses import Response

from qlora_ray.registry import RegistryError, check_adapter_id
from qlora_ray.serving.catalog import REJECTED, Catalogs
from qlora_ray.serving.guards import (
    ApiError,
    GuardConfig,
    Guards,
    SafeJSONResponse,
    hide_paths,
    parse_json,
    public,
    quote,
    route_path,
    text_problem,
)
from qlora_ray.serving.openai_api import OpenAIRoutes, error_body, rejected, router
from qlora_ray.serving.protocol import GenerationRequest, GenerationResult, ReplicaError, StreamChunk
from qlora_ray.serving.settings import ServeSettings

logger = logging.getLogger("ray.serve")
NATIVE_PATHS = frozenset({"/healthz", "/v1/adapters", "/v1/summarize", "/v1/stats"})
LATENCY_MS_BOUNDARIES = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 30_000, 60_000, 120_000]
UNRESOLVED = "unresolved"  # the metrics' adapter tag before a request names a known model

# ---------------------------------------------------------------------------------------------
# Errors: one ApiError, rendered in the shape of the API its path belongs to


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/") and path not in NATIVE_PATHS


def render_error(path: str, e: ApiError) -> Response:
    body = error_body(e) if is_openai_path(path) else {"error": e.message}
    return SafeJSONResponse(body, status_code=e.status, headers=e.headers)


_GUARDS: dict[str, GuardConfig] = {}  # this process's Api replica sets it


def _guard_config() -> GuardConfig:
    config = _GUARDS.get("config")
    return config if config is not None else GuardConfig.from_settings(ServeSettings())


api = FastAPI(title="qlora-ray", description="LoRA adapters on one shared base: native and OpenAI-style APIs.",
              docs_url=None, redoc_url=None)
api.add_middleware(Guards, config=_guard_config, render=render_error)
api.include_router(router)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError) -> Response:
    return render_error(route_path(request.scope), exc)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> Response:
    path = route_path(request.scope)
    if exc.status_code == 404:
        message, code = f"Invalid URL ({request.method} {quote(path, 200)})", "not_found"
    elif exc.status_code == 405:
        message, code = f"Method {request.method} is not allowed for {quote(path, 200)}", "method_not_allowed"
    else:
        message, code = str(exc.detail), None
    return render_error(path, ApiError(exc.status_code, message, code=code, headers=dict(exc.headers or {})))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    parts = [f"{'.'.join(_loc(x) for x in p.get('loc', ()))}: {p.get('msg')}" for p in exc.errors()[:5]]
    return render_error(route_path(request.scope), ApiError(400, "invalid request: " + "; ".join(parts)))


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> Response:
    logger.exception("unexpected error in %s %s", request.method, route_path(request.scope))
    return render_error(route_path(request.scope), ApiError(500, f"internal error: {type(exc).__name__}"))


# ---------------------------------------------------------------------------------------------
# Calls to the model replicas


class ModelClient:
    """The AdapterModel handle with a deadline, and its failures as ApiErrors."""

    def __init__(self, handle: DeploymentHandle, timeout_s: float, show_paths: bool):
        self.handle, self.timeout_s, self.show_paths = handle, timeout_s, show_paths

    def _options(self, adapter: str | None, stream: bool = False):
        options: dict[str, Any] = {"stream": True} if stream else {}
        if adapter is not None:
            options["multiplexed_model_id"] = adapter
        return self.handle.options(**options) if options else self.handle

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        response = self._options(request.adapter).generate.remote(request)
        try:
            result = await asyncio.wait_for(_awaited(response), self.timeout_s)
        except Exception as e:
            raise self._failure(e, response.cancel, "generate") from None
        if isinstance(result, ReplicaError):
            raise self.replica_error(result)
        if not isinstance(result, GenerationResult):
            raise ApiError(500, "generation failed: the model replica answered something unexpected",
                           code="generation_failed")
        return result

    async def open_stream(
        self, request: GenerationRequest
    ) -> tuple[StreamChunk | None, AsyncGenerator[StreamChunk, None]]:
        """The first chunk (so its errors still get a status line) and an iterator over the rest."""
        gen = self._options(request.adapter, stream=True).generate_stream.remote(request)
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        try:
            first = await self._next(gen, deadline)
        except BaseException:
            gen.cancel()
            raise
        return first, self._rest(gen, deadline, done=first is None)

    async def _rest(self, gen, deadline: float, done: bool) -> AsyncGenerator[StreamChunk, None]:
        try:
            while not done:
                chunk = await self._next(gen, deadline)
                if chunk is None:
                    done = True
                    break
                yield chunk
        finally:
            if not done:
                gen.cancel()

    async def _next(self, gen, deadline: float) -> StreamChunk | None:
        remaining = deadline - asyncio.get_running_loop().time()
        try:
            item = await asyncio.wait_for(gen.__anext__(), max(remaining, 0.001))
        except StopAsyncIteration:
            return None
        except Exception as e:
            raise self._failure(e, gen.cancel, "generate_stream") from None
        if isinstance(item, ReplicaError):
            raise self.replica_error(item)
        if not isinstance(item, StreamChunk):
            raise ApiError(500, "generation failed: the model replica streamed something unexpected",
                           code="generation_failed")
        return item

    async def call(self, method: str, timeout_s: float | None = None) -> Any:
        """A plain method of the model deployment (ping, status)."""
        response = getattr(self.handle, method).remote()
        try:
            return await asyncio.wait_for(_awaited(response), timeout_s or self.timeout_s)
        except Exception as e:
            raise self._failure(e, response.cancel, method) from None

    def _failure(self, e: Exception, cancel: Callable[[], None], what: str) -> ApiError:
        if isinstance(e, TimeoutError):
            cancel()
            return ApiError(504, f"the model did not answer within {self.timeout_s:g} s", code="timeout")
        if isinstance(e, BackPressureError):
            return overloaded("the model replicas' queues are full; retry later", e.retry_after_s)
        if isinstance(e, DeploymentUnavailableError):
            return overloaded("the model deployment is unavailable; retry later", None, code="unavailable")
        logger.error("model %s failed: %s: %s", what, type(e).__name__, str(e)[:2000])
        return ApiError(500, f"generation failed: {type(e).__name__}", code="generation_failed")

    def replica_error(self, err: ReplicaError) -> ApiError:
        status = err.status if isinstance(err.status, int) and 400 <= err.status <= 599 else 500
        message = str(err.message) if self.show_paths else hide_paths(str(err.message))
        code = "model_not_found" if err.code == "adapter_not_found" else str(err.code)
        if status == 503:
            return overloaded(message, None, code=code)
        return ApiError(status, message, code=code, param="messages" if err.code == "invalid_messages" else None)


async def _awaited(response) -> Any:
    return await response


def overloaded(message: str, retry_after_s: float | None, code: str = "queue_full") -> ApiError:
    retry = max(1, math.ceil(retry_after_s)) if retry_after_s else 1
    return ApiError(503, message, code=code, headers={"Retry-After": str(retry)})


# ---------------------------------------------------------------------------------------------
# Metrics


class IngressMetrics:
    def __init__(self):
        self.requests = metrics.Counter("qlora_ray_requests", "Generation requests (summarize and completions)",
                                        tag_keys=("adapter",))
        self.errors = metrics.Counter("qlora_ray_request_errors", "Generation requests answered with an error",
                                      tag_keys=("adapter", "code"))
        self.latency_ms = metrics.Histogram("qlora_ray_request_latency_ms",
                                            "Latency of successful generation requests (ms)",
                                            boundaries=LATENCY_MS_BOUNDARIES, tag_keys=("adapter",))
        self.tokens = metrics.Counter("qlora_ray_generated_tokens", "Tokens generated", tag_keys=("adapter",))


class Record:
    """One generation request's metrics, recorded when its `async with` block ends (for a stream:
    the block the stream runs in, after `detach()` handed it over)."""

    def __init__(self, sink: IngressMetrics, started: float | None = None):
        self.sink, self.started = sink, time.perf_counter() if started is None else started
        self.adapter, self.tokens, self.status, self.detached = UNRESOLVED, 0, 200, False

    def fail(self, e: ApiError) -> None:
        self.status = e.status

    def detach(self) -> "Record":
        self.detached = True
        other = Record(self.sink, self.started)
        other.adapter = self.adapter
        return other

    async def __aenter__(self) -> "Record":
        return self

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        if self.detached:
            return False
        if isinstance(exc, ApiError):
            self.fail(exc)
        elif isinstance(exc, asyncio.CancelledError):
            self.status = 499  # the client went away
        elif exc is not None:
            self.status = 500
        tags = {"adapter": self.adapter}
        try:
            self.sink.requests.inc(1, tags)
            if self.status == 200:
                self.sink.latency_ms.observe((time.perf_counter() - self.started) * 1000, tags)
            else:
                self.sink.errors.inc(1, {"adapter": self.adapter, "code": str(self.status)})
            if self.tokens:
                self.sink.tokens.inc(self.tokens, tags)
        except Exception:  # metrics never fail a request
            logger.exception("recording metrics failed")
        return False


# ---------------------------------------------------------------------------------------------
# The native API and the deployment


class SummarizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    text: str | list[str]
    adapter: str | None = None
    max_new_tokens: int | None = None


def validation_message(exc: ValidationError) -> str:
    parts = []
    for p in exc.errors(include_url=False, include_input=False):
        where = ".".join(_loc(x) for x in p.get("loc", ()))
        parts.append(f"{where or 'body'}: {p.get('msg')}")
    return "; ".join(parts[:5]) + (f"; and {len(parts) - 5} more" if len(parts) > 5 else "")


def _loc(part: object) -> str:
    """A location in the body for a message: plain names as they are, a client's odd keys quoted."""
    if isinstance(part, int) or (isinstance(part, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,40}", part)):
        return str(part)
    return quote(part, 40)


@serve.deployment(name="Api", num_replicas=1, max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(api)
class Api(OpenAIRoutes):
    def __init__(self, models: list[DeploymentHandle], settings: ServeSettings):
        self.settings = settings
        _GUARDS["config"] = GuardConfig.from_settings(settings)
        # One model deployment per registry, in the same order as the catalogs.
        self.catalog = Catalogs(settings.registries(), max_adapter_bytes=settings.max_adapter_bytes)
        self.clients = [ModelClient(m, settings.request_timeout_s, settings.show_paths) for m in models]
        self.metrics = IngressMetrics()

    # ---- shared by both APIs ----

    def accounting(self) -> Record:
        return Record(self.metrics)

    def client_for(self, registry: int) -> ModelClient:
        return self.clients[registry]

    async def call_catalog(self, fn: Callable[[Catalogs], Any]) -> Any:
        """Catalog work off the event loop (it stats files and may check an adapter)."""
        return await asyncio.to_thread(fn, self.catalog)

    async def check_ready(self, adapter_id: str) -> None:
        status, reason = await self.call_catalog(lambda c: c.adapter_status(adapter_id))
        if status == REJECTED:
            raise rejected(adapter_id, reason if self.settings.show_paths else hide_paths(reason or ""))

    # ---- native routes ----

    @api.get("/healthz")
    async def healthz(self) -> Response:
        try:
            timeout_s = min(10.0, self.settings.request_timeout_s)
            await asyncio.gather(*(c.call("ping", timeout_s=timeout_s) for c in self.clients))
        except ApiError as e:
            return render_error("/healthz", ApiError(503, f"the model replicas are not answering ({e.message})"))
        return SafeJSONResponse({"status": "ok"})

    @api.get("/v1/adapters")
    async def adapters(self) -> Response:
        def listing(catalogs: Catalogs) -> dict:
            """The first registry's default and base; with several registries, each one's under
            "registries" and every adapter (each names its base_model) in "adapters"."""
            adapters, registries = [], []
            for i, catalog in enumerate(catalogs.catalogs):
                index = catalog.index()
                registries.append({"default": index.get("default"), "base_model": index.get("base_model"),
                                   "base_metrics": index.get("base_metrics") or {}})
                for entry in index["adapters"]:
                    if catalogs.owner(entry["id"]) != i:
                        continue  # shadowed by an earlier registry's adapter of the same id
                    status, reason = catalog.adapter_status(entry["id"])
                    adapters.append(entry | {"status": status} | ({"reason": reason} if reason else {}))
            body = registries[0] | {"adapters": adapters}
            return body | ({"registries": registries} if len(registries) > 1 else {})

        body = await self.call_catalog(listing)
        return SafeJSONResponse(public(body, self.settings.show_paths))

    @api.get("/v1/stats")
    async def stats(self) -> Response:
        timeout_s = min(10.0, self.settings.request_timeout_s)
        statuses = await asyncio.gather(*(c.call("status", timeout_s=timeout_s) for c in self.clients))
        body = statuses[0] if len(statuses) == 1 else {"registries": list(statuses)}
        return SafeJSONResponse(public(body, self.settings.show_paths))

    @api.post("/v1/summarize")
    async def summarize(self, request: Request) -> Response:
        async with self.accounting() as record:
            body = self._summarize_request(parse_json(await request.body()))
            s = self.settings
            texts = [body.text] if isinstance(body.text, str) else body.text
            if not texts:
                raise ApiError(422, "text: give a string or a non-empty list of strings")
            if len(texts) > s.max_texts:
                raise ApiError(413, f"text: at most {s.max_texts} texts per request, got {len(texts)}")
            for i, t in enumerate(texts):
                problem = text_problem(t, f"text[{i}]" if len(texts) > 1 else "text", s.max_text_chars)
                if problem is not None:
                    raise ApiError(413 if problem.kind == "too_long" else 422, problem.message)
            if body.max_new_tokens is not None and not 1 <= body.max_new_tokens <= s.max_new_tokens_limit:
                raise ApiError(422, f"max_new_tokens must be between 1 and {s.max_new_tokens_limit}, "
                                    f"got {quote(body.max_new_tokens, 40)}")
            adapter, registry = await self._native_adapter(body.adapter)
            record.adapter = adapter
            result = await self.client_for(registry).generate(GenerationRequest(
                prompts=texts, adapter=adapter, max_new_tokens=body.max_new_tokens or s.default_max_new_tokens,
                request_id=request.headers.get("x-request-id", "")[:100]))
            record.tokens = sum(c.completion_tokens for c in result.completions)
            by_prompt = {c.prompt_index: c.text.strip() for c in result.completions}
            summaries = [by_prompt.get(i, "") for i in range(len(texts))]
            return SafeJSONResponse({"adapter": adapter,
                                     "summary": summaries[0] if isinstance(body.text, str) else summaries})

    @staticmethod
    def _summarize_request(data: object) -> SummarizeRequest:
        try:
            return SummarizeRequest.model_validate(data)
        except ValidationError as e:
            raise ApiError(422, validation_message(e)) from None

    async def _native_adapter(self, adapter: str | None) -> tuple[str, int]:
        """The request's adapter (or the default) and its registry; registered and not rejected."""
        if adapter is None:
            adapter, _ = await self.call_catalog(lambda c: c.default())
            if adapter is None:
                raise ApiError(503, "no adapters registered yet", code="no_adapters")
        elif adapter == "":
            raise ApiError(422, "adapter must not be empty: omit it (or send null) for the default adapter")
        try:
            check_adapter_id(adapter)
        except RegistryError:
            raise ApiError(400, "adapter id must be 1-128 characters of lowercase letters, digits, '-' or '_', "
                                f"starting with a letter or digit; got {quote(adapter)}") from None
        registry = await self.call_catalog(lambda c: c.owner(adapter))
        if registry is None:
            raise ApiError(404, f"unknown adapter {quote(adapter)}", code="model_not_found")
        await self.check_ready(adapter)
        return adapter, registry
