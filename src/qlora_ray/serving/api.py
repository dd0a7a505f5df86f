"""The HTTP API (FastAPI on a Serve ingress): validation, adapter resolution, JSON errors.

    GET  /healthz         200 once the model replicas answer
    GET  /v1/adapters     {"default": id, "base_model": ..., "adapters": [{"id", "metrics", ...}]}
    POST /v1/summarize    {"text": str | [str], "adapter"?: id, "max_new_tokens"?: int}
                          -> {"adapter": id, "summary": str | [str]}
Every error is a 4xx/5xx JSON body {"error": "..."}.
"""


import json
import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

from qlora_ray.registry import Registry, RegistryError, UnknownAdapter, check_adapter_id
from qlora_ray.serving.settings import ServeSettings

logger = logging.getLogger("ray.serve")
api = FastAPI(title="qlora-ray", description="Summaries from LoRA adapters on one shared 4-bit base.")


class SummarizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    text: str | list[str]
    adapter: str | None = None
    max_new_tokens: int | None = None


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message})


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for p in exc.errors():
        where = ".".join(str(x) for x in p.get("loc", ()))
        parts.append(f"{where or 'body'}: {p.get('msg')}")
    return "; ".join(parts)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return _error(exc.status_code, str(exc.detail))


@serve.deployment(name="Api", num_replicas=1, ray_actor_options={"num_cpus": 0.1})
@serve.ingress(api)
class Api:
    def __init__(self, model: DeploymentHandle, settings: ServeSettings):
        self.model = model
        self.settings = settings
        self.registry = Registry(settings.registry)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        await self.model.ping.remote()
        return {"status": "ok"}

    @api.get("/v1/adapters")
    async def adapters(self) -> dict:
        index = self.registry.read()
        return {
            "default": index.get("default"),
            "base_model": index.get("base_model"),
            "base_metrics": index.get("base_metrics", {}),
            "adapters": index.get("adapters", []),
        }

    @api.post("/v1/summarize")
    async def summarize(self, request: Request) -> JSONResponse:
        # Parsed here rather than by FastAPI: any content type, and our own error messages.
        try:
            body = SummarizeRequest.model_validate(json.loads(await request.body()))
        except json.JSONDecodeError:
            return _error(400, "request body is not valid JSON")
        except ValidationError as e:
            return _error(422, _validation_message(e))
        s = self.settings
        texts = [body.text] if isinstance(body.text, str) else body.text
        if not texts:
            return _error(422, "text: give a string or a non-empty list of strings")
        if len(texts) > s.max_texts:
            return _error(413, f"text: at most {s.max_texts} texts per request, got {len(texts)}")
        for i, t in enumerate(texts):
            if not t.strip():
                return _error(422, f"text[{i}] is empty" if len(texts) > 1 else "text is empty")
            if len(t) > s.max_text_chars:
                return _error(413, f"text{f'[{i}]' if len(texts) > 1 else ''} has {len(t)} characters; "
                                   f"the limit is {s.max_text_chars}")
        max_new = s.default_max_new_tokens if body.max_new_tokens is None else body.max_new_tokens
        if not 1 <= max_new <= s.max_new_tokens_limit:
            return _error(422, f"max_new_tokens must be between 1 and {s.max_new_tokens_limit}, got {max_new}")

        adapter = body.adapter or self.registry.read().get("default")
        if adapter is None:
            return _error(503, "no adapters registered yet")
        try:
            check_adapter_id(adapter)
            self.registry.adapter(adapter)
        except UnknownAdapter as e:
            return _error(404, str(e))
        except RegistryError as e:
            return _error(400, str(e))

        try:
            summaries = await self.model.options(multiplexed_model_id=adapter).summarize.remote(texts, max_new)
        except Exception as e:  # the replica failed: report it, keep serving
            logger.exception("summarize failed for adapter %s", adapter)
            return _error(500, f"generation failed: {type(e).__name__}")
        return JSONResponse({"adapter": adapter, "summary": summaries[0] if isinstance(body.text, str) else summaries})
