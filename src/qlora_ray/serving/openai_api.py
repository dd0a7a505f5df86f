"""OpenAI-compatible routes: the models and text completions, in OpenAI's request and response
shapes, so the official `openai` client (and tools built on it) can call the adapters.

    GET  /v1/models               {"object": "list", "data": [model, ...]}: the base, then every adapter
    GET  /v1/models/{id}          one model object
    POST /v1/completions          `model` = an adapter id or the base's id; `prompt` a string or strings;
                                  max_tokens, temperature, top_p, n, stop, seed, stream (+ stream_options),
                                  user; ignore_eos (vLLM's extension)
    *    /v1/chat/completions     404: only text completions are served

Errors use OpenAI's envelope {"error": {"message", "type", "param", "code"}}.
"""

# No `from __future__ import annotations`: FastAPI resolves the routes' annotations in the
# replica, where Serve may have pickled them by value.

import json
import re
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from starlette.responses import Response, StreamingResponse

from qlora_ray.registry import RegistryError, check_adapter_id
from qlora_ray.serving.catalog import Model
from qlora_ray.serving.guards import ApiError, SafeJSONResponse, parse_json, quote, text_problem
from qlora_ray.serving.protocol import GenerationRequest, GenerationResult, StreamChunk

router = APIRouter()

OWNER = "qlora-ray"
MAX_N = 16  # completions per prompt
MAX_STOP = 4  # stop sequences, as OpenAI
MAX_STOP_CHARS = 256
SEED_RANGE = (-(2**63), 2**63 - 1)  # int64, as OpenAI; passed on modulo 2**32
# Accepted, and only their no-op values: anything else is a 400 naming the parameter.
NEUTRAL = {
    "logprobs": (None,),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
}
SHARED = {"model", "temperature", "top_p", "n", "stop", "seed", "stream", "stream_options", "user", "ignore_eos"}
KNOWN = {*SHARED, "prompt", "max_tokens", *NEUTRAL}
CHAT_NEUTRAL = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None, True, False),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
    "store": (None, False),
}
CHAT_KNOWN = {*SHARED, "messages", "max_tokens", "max_completion_tokens", *CHAT_NEUTRAL}
CHAT_ROLES = ("system", "developer", "user", "assistant")
MAX_MESSAGES = 256


def error_body(e: ApiError) -> dict:
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


def invalid(message: str, param: str | None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# ---------------------------------------------------------------------------------------------
# Requests


@dataclass
class CompletionParams:
    model: str
    prompts: list[str]
    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False
    messages: list[dict[str, str]] | None = None  # a chat (prompts is then empty)


def param_name(name: str) -> str:
    """A client's parameter name as it is when it looks like one, else quoted (ASCII, bounded)."""
    return name if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]{0,63}", name) else quote(name, 60)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int(body: dict, name: str, low: int, high: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v):
        raise invalid(f"{name} must be an integer", name, "invalid_type")
    if not low <= v <= high:
        raise invalid(f"{name} must be between {low} and {high}, got {quote(v, 40)}", name, "invalid_value")
    return v


def _number(body: dict, name: str, default: float, check, rule: str) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not _is_number(v):
        raise invalid(f"{name} must be a number", name, "invalid_type")
    try:
        value = float(v)
    except OverflowError:
        value = float("inf")
    if not check(value):
        raise invalid(f"{name} must be {rule}, got {quote(v, 40)}", name, "invalid_value")
    return value


def _bool(body: dict, name: str) -> bool:
    v = body.get(name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise invalid(f"{name} must be a boolean", name, "invalid_type")
    return v


def _neutral(value: object, allowed: tuple) -> bool:
    for a in allowed:
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            if _is_number(value) and value == a:
                return True
        elif value == a and type(value) is type(a):
            return True
    return False


def _values(allowed: tuple) -> str:
    return " or ".join(json.dumps(a) for a in allowed)


def _check_names(body: object, known: set[str], neutral: dict[str, tuple]) -> dict:
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object", None)
    for name in body:
        if name not in known:
            raise invalid(f"Unrecognized request argument supplied: {param_name(name)}", param_name(name),
                          "unknown_parameter")
    for name, allowed in neutral.items():
        if not _neutral(body.get(name), allowed):
            raise invalid(f"{name} is not supported by this server (only {_values(allowed)})", name,
                          "unsupported_parameter")
    model = body.get("model")
    if model is None:
        raise invalid("you must provide a model parameter", "model", "missing_required_parameter")
    if not isinstance(model, str):
        raise invalid("model must be a string", "model", "invalid_type")
    return body


def parse_completion_request(body: object, settings) -> CompletionParams:
    """A /v1/completions body -> CompletionParams; every problem is a 400 naming its parameter."""
    body = _check_names(body, KNOWN, NEUTRAL)
    if "prompt" not in body or body["prompt"] is None:
        raise invalid("you must provide a prompt parameter", "prompt", "missing_required_parameter")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        prompts = prompt
    elif isinstance(prompt, list) and all(_is_int(p) or isinstance(p, list) for p in prompt):
        raise invalid("token-id prompts are not supported: send text", "prompt", "unsupported_parameter")
    else:
        raise invalid("prompt must be a string or a list of strings", "prompt", "invalid_type")
    if not prompts:
        raise invalid("prompt must not be an empty list", "prompt", "invalid_value")
    if len(prompts) > settings.max_texts:
        raise invalid(f"at most {settings.max_texts} prompts per request, got {len(prompts)}", "prompt",
                      "invalid_value")
    for i, p in enumerate(prompts):
        problem = text_problem(p, "prompt" if isinstance(prompt, str) else f"prompt[{i}]", settings.max_text_chars)
        if problem is not None:
            raise invalid(problem.message, "prompt", "invalid_value")
    max_tokens = _int(body, "max_tokens", 1, settings.max_new_tokens_limit)
    return _sampling(body, settings, CompletionParams(model=body["model"], prompts=prompts, max_tokens=max_tokens))


def parse_chat_request(body: object, settings) -> CompletionParams:
    """A /v1/chat/completions body -> CompletionParams with `messages`; every problem is a 400."""
    body = _check_names(body, CHAT_KNOWN, CHAT_NEUTRAL)
    messages = _chat_messages(body.get("messages"), settings)
    max_tokens = _int(body, "max_completion_tokens", 1, settings.max_new_tokens_limit)
    legacy = _int(body, "max_tokens", 1, settings.max_new_tokens_limit)  # the deprecated name
    if max_tokens is not None and legacy is not None and legacy != max_tokens:
        raise invalid("give max_completion_tokens or max_tokens, not both", "max_tokens", "invalid_value")
    params = CompletionParams(model=body["model"], prompts=[], messages=messages,
                              max_tokens=max_tokens if max_tokens is not None else legacy)
    return _sampling(body, settings, params)


def _chat_messages(messages: object, settings) -> list[dict[str, str]]:
    """OpenAI's messages -> [{"role", "content"}] with text content; tools and images are not served."""
    if messages is None:
        raise invalid("you must provide a messages parameter", "messages", "missing_required_parameter")
    if not isinstance(messages, list):
        raise invalid("messages must be a list of message objects", "messages", "invalid_type")
    if not messages:
        raise invalid("messages must not be empty", "messages", "invalid_value")
    if len(messages) > MAX_MESSAGES:
        raise invalid(f"at most {MAX_MESSAGES} messages per request, got {len(messages)}", "messages",
                      "invalid_value")
    out, total = [], 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(f"{where} must be an object", where, "invalid_type")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise invalid(f"{where}.role must be one of {', '.join(CHAT_ROLES)}, got {quote(role, 40)}",
                          f"{where}.role", "invalid_value")
        for name in m:
            if name not in ("role", "content", "name"):
                raise invalid(f"{where}: {param_name(name)} is not supported by this server (text messages only)",
                              f"{where}.{param_name(name)}", "unsupported_parameter")
        if m.get("name") is not None and not isinstance(m["name"], str):
            raise invalid(f"{where}.name must be a string", f"{where}.name", "invalid_type")
        content = m.get("content")
        if isinstance(content, list):  # content parts: text only
            texts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise invalid(f"{where}.content[{j}]: only text parts are supported", f"{where}.content",
                                  "unsupported_parameter")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise invalid(f"{where}.content must be a string or a list of text parts", f"{where}.content",
                          "invalid_type")
        problem = text_problem(content, f"{where}.content", settings.max_text_chars)
        if problem is not None and problem.kind != "empty":
            raise invalid(problem.message, f"{where}.content", "invalid_value")
        total += len(content)
        if total > settings.max_text_chars * settings.max_texts:
            raise invalid(f"the messages hold more than {settings.max_text_chars * settings.max_texts} characters",
                          "messages", "invalid_value")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    if out[-1]["role"] == "assistant":
        raise invalid("the last message must not be the assistant's: the model writes the next assistant turn",
                      "messages", "invalid_value")
    return out


def _sampling(body: dict, settings, params: CompletionParams) -> CompletionParams:
    """The parameters completions and chat share: sampling, n, stop, seed, streaming."""
    count = max(1, len(params.prompts))
    params.temperature = _number(body, "temperature", 0.0, lambda x: 0 <= x <= 2, "between 0 and 2")
    params.top_p = _number(body, "top_p", 1.0, lambda x: 0 < x <= 1, "greater than 0 and at most 1")
    params.n = _int(body, "n", 1, MAX_N) or 1
    if count * params.n > settings.max_texts:
        raise invalid(f"at most {settings.max_texts} completions per request (prompts x n), "
                      f"got {count} x {params.n}", "n", "invalid_value")
    params.seed = _int(body, "seed", *SEED_RANGE)

    stop = body.get("stop")
    if stop is None:
        stops: list[str] = []
    elif isinstance(stop, str):
        stops = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = stop
    else:
        raise invalid("stop must be a string or a list of strings", "stop", "invalid_type")
    if len(stops) > MAX_STOP:
        raise invalid(f"stop takes at most {MAX_STOP} sequences, got {len(stops)}", "stop", "invalid_value")
    for s in stops:
        if not s or len(s) > MAX_STOP_CHARS:
            raise invalid(f"each stop sequence must have 1 to {MAX_STOP_CHARS} characters", "stop", "invalid_value")
        problem = text_problem(s, "stop", MAX_STOP_CHARS)
        if problem is not None and problem.kind == "surrogate":
            raise invalid(problem.message, "stop", "invalid_value")
    params.stop = stops

    params.stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not params.stream:
            raise invalid("stream_options is only allowed when stream is true", "stream_options", "invalid_value")
        if not isinstance(options, dict):
            raise invalid("stream_options must be an object", "stream_options", "invalid_type")
        for name in options:
            if name != "include_usage":
                raise invalid(f"Unrecognized stream_options argument: {param_name(name)}", "stream_options",
                              "unknown_parameter")
        params.include_usage = _bool(options, "include_usage")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid("user must be a string", "user", "invalid_type")
    params.ignore_eos = _bool(body, "ignore_eos")
    return params


def generation_request(params: CompletionParams, adapter: str | None, request_id: str) -> GenerationRequest:
    return GenerationRequest(prompts=params.prompts, adapter=adapter, max_new_tokens=params.max_tokens,
                             temperature=params.temperature, top_p=params.top_p, n=params.n, stop=params.stop,
                             seed=None if params.seed is None else params.seed % 2**32, request_id=request_id,
                             ignore_eos=params.ignore_eos, messages=params.messages)


# ---------------------------------------------------------------------------------------------
# Responses


def model_object(model: Model) -> dict:
    obj = {"id": model.id, "object": "model", "created": model.created, "owned_by": OWNER}
    if model.adapter is not None:
        obj["parent"] = model.parent
    return obj


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def result_usage(result: GenerationResult) -> dict:
    prompt_tokens = {c.prompt_index: c.prompt_tokens for c in result.completions}  # once per prompt, not per choice
    return usage(sum(prompt_tokens.values()), sum(c.completion_tokens for c in result.completions))


@dataclass
class Header:
    """What every body of one response repeats."""

    id: str
    created: int
    model: str
    include_usage: bool

    def envelope(self, object_type: str) -> dict:
        return {"id": self.id, "object": object_type, "created": self.created, "model": self.model}


class Shape:
    """How a response looks: text completions (TEXT) or chat completions (CHAT)."""

    id_prefix = "cmpl"
    object = chunk_object = "text_completion"

    def body(self, completion_id: str, created: int, model: str, result: GenerationResult) -> dict:
        choices = [self.choice(c) for c in sorted(result.completions, key=lambda c: c.index)]
        header = Header(completion_id, created, model, False)
        return header.envelope(self.object) | {"choices": choices, "usage": result_usage(result)}

    def choice(self, c) -> dict:
        return {"text": c.text, "index": c.index, "logprobs": None, "finish_reason": c.finish_reason}

    def opening(self, header: Header, n: int) -> list[dict]:
        return []

    def chunk(self, header: Header, chunk: StreamChunk) -> dict:
        choice = {"text": chunk.text, "index": chunk.index, "logprobs": None, "finish_reason": chunk.finish_reason}
        return self._chunk_body(header, choice)

    def _chunk_body(self, header: Header, choice: dict) -> dict:
        body = header.envelope(self.chunk_object) | {"choices": [choice]}
        return body | ({"usage": None} if header.include_usage else {})


class ChatShape(Shape):
    id_prefix = "chatcmpl"
    object, chunk_object = "chat.completion", "chat.completion.chunk"

    def choice(self, c) -> dict:
        return {"index": c.index, "message": {"role": "assistant", "content": c.text, "refusal": None},
                "logprobs": None, "finish_reason": c.finish_reason}

    def opening(self, header: Header, n: int) -> list[dict]:
        """As OpenAI: each choice's stream starts with the assistant role and empty content."""
        return [self._chunk_body(header, {"index": i, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}) for i in range(n)]

    def chunk(self, header: Header, chunk: StreamChunk) -> dict:
        delta = {"content": chunk.text} if chunk.text else {}
        return self._chunk_body(header, {"index": chunk.index, "delta": delta, "logprobs": None,
                                         "finish_reason": chunk.finish_reason})


TEXT, CHAT = Shape(), ChatShape()


def sse(data: dict | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=True, allow_nan=False,
                                                         separators=(",", ":"))
    return f"data: {text}\n\n".encode()


class StreamUsage:
    """Token counts over a stream: each chunk carries its choice's counts so far."""

    def __init__(self, n: int):
        self.n = n
        self.prompt: dict[int, int] = {}
        self.completion: dict[int, int] = {}

    def add(self, chunk: StreamChunk) -> None:
        p = chunk.index // self.n
        self.prompt[p] = max(self.prompt.get(p, 0), chunk.prompt_tokens)
        self.completion[chunk.index] = max(self.completion.get(chunk.index, 0), chunk.completion_tokens)

    @property
    def completion_tokens(self) -> int:
        return sum(self.completion.values())

    def body(self) -> dict:
        return usage(sum(self.prompt.values()), self.completion_tokens)


# ---------------------------------------------------------------------------------------------
# Routes (methods of the Api deployment, which provides catalog, settings and client)


class OpenAIRoutes:
    """Mixed into the `Api` deployment (api.py), whose instance Serve passes as `self`. It provides
    `settings`, `client` (the model handle: generate, open_stream), `call_catalog(fn)`,
    `check_ready(adapter_id)` and `accounting()` (the request's metrics record)."""

    @router.get("/v1/models")
    async def list_models(self) -> Response:
        models = await self.call_catalog(lambda c: c.models())
        return SafeJSONResponse({"object": "list", "data": [model_object(m) for m in models]})

    @router.get("/v1/models/{model_id:path}")
    async def retrieve_model(self, model_id: str) -> Response:
        model = await self.call_catalog(lambda c: c.model(model_id))
        if model is None:
            raise model_not_found(model_id)
        return SafeJSONResponse(model_object(model))

    @router.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        params = parse_completion_request(parse_json(await request.body()), self.settings)
        return await self._generate(params, TEXT)

    @router.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        params = parse_chat_request(parse_json(await request.body()), self.settings)
        return await self._generate(params, CHAT)

    async def _generate(self, params: CompletionParams, shape: "Shape") -> Response:
        async with self.accounting() as record:
            model = await self.resolve_model(params.model)
            record.adapter = model.id
            completion_id = f"{shape.id_prefix}-{uuid.uuid4().hex}"
            created = int(time.time())
            req = generation_request(params, model.adapter, completion_id)
            client = self.client_for(model.registry)
            if not params.stream:
                result = await client.generate(req)
                record.tokens = sum(c.completion_tokens for c in result.completions)
                return SafeJSONResponse(shape.body(completion_id, created, model.id, result))
            first, rest = await client.open_stream(req)
            header = Header(completion_id, created, model.id, params.include_usage)
            stream = self._events(record.detach(), first, rest, params, header, shape)
            return StreamingResponse(stream, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _events(self, record, first: StreamChunk | None, rest: AsyncGenerator[StreamChunk, None],
                      params: CompletionParams, header: "Header", shape: "Shape") -> AsyncIterator[bytes]:
        counts = StreamUsage(params.n)
        async with record:
            try:
                for body in shape.opening(header, params.n):
                    yield sse(body)
                chunk = first
                while chunk is not None:
                    counts.add(chunk)
                    if chunk.text or chunk.finish_reason:
                        yield sse(shape.chunk(header, chunk))
                    chunk = await anext(rest, None)
            except ApiError as e:  # mid-stream: the status line is gone, so say it in the stream
                record.fail(e)
                yield sse(error_body(e))
                yield sse("[DONE]")
                return
            finally:
                record.tokens = counts.completion_tokens
                await rest.aclose()  # a client that went away cancels the replica's rows
            if params.include_usage:
                yield sse(header.envelope(shape.chunk_object) | {"choices": [], "usage": counts.body()})
            yield sse("[DONE]")

    async def resolve_model(self, model_id: str) -> Model:
        """The base's id or an adapter id -> Model; 400 malformed id, 404 unknown, 422 rejected adapter."""
        model = await self.call_catalog(lambda c: c.model(model_id))
        if model is None:
            try:
                check_adapter_id(model_id)
            except RegistryError:
                raise ApiError(400, f"model must be the base model's id or an adapter id (1-128 lowercase "
                                    f"letters, digits, '-' or '_'); got {quote(model_id)}",
                               param="model", code="invalid_model") from None
            raise model_not_found(model_id)
        if model.adapter is not None:
            await self.check_ready(model.adapter)
        return model


def model_not_found(model_id: str) -> ApiError:
    return ApiError(404, f"The model {quote(model_id)} does not exist", param="model", code="model_not_found")


def rejected(adapter_id: str, reason: str | None) -> ApiError:
    return ApiError(422, f"adapter {adapter_id!r} is rejected: {reason}", param="model", code="adapter_rejected")

