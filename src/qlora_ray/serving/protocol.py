"""What the HTTP ingress and the model replicas say to each other.

The ingress validates a request, resolves the adapter and sends a `GenerationRequest`; the
replica answers with a `GenerationResult` (or streams `StreamChunk`s). Failures come back as
values (`ReplicaError`), not exceptions, so one request's failure never fails another's and
the ingress can map each to its HTTP status without unpickling exception classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GenerationRequest:
    prompts: list[str]  # raw texts: the replica formats them as the adapter's training prompts were
    adapter: str | None  # a registry adapter id; None is the bare base model
    max_new_tokens: int | None = None  # None: the adapter's task default
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    n: int = 1  # completions per prompt
    stop: list[str] = field(default_factory=list)  # cut the text before the first of these
    seed: int | None = None  # sampling seed; choice j of a prompt uses seed + j
    request_id: str = ""
    ignore_eos: bool = False  # generate max_new_tokens even past end-of-sequence (vLLM's extension; benchmarks)
    # A chat instead of prompts: [{"role", "content"}], rendered with the tokenizer's chat template.
    messages: list[dict[str, str]] | None = None


@dataclass
class Completion:
    index: int  # choice index: prompt_index * n + j
    prompt_index: int
    text: str
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class GenerationResult:
    adapter: str | None
    completions: list[Completion]


@dataclass
class StreamChunk:
    index: int  # choice index, as in Completion
    text: str  # new text since the last chunk of this choice
    finish_reason: str | None = None  # set on the choice's last chunk
    prompt_tokens: int = 0
    completion_tokens: int = 0  # so far


@dataclass
class ReplicaError:
    status: int  # the HTTP status the ingress answers with
    code: str  # machine-readable: see CODES
    message: str


# code -> HTTP status
CODES = {
    "adapter_not_found": 404,
    "adapter_rejected": 422,  # registered, but failed validation: the message names why
    "invalid_request": 422,
    "unsupported": 400,  # e.g. a chat for a model without a chat template
    "invalid_messages": 400,  # a chat the adapter's format cannot take (e.g. a conversation for a prompt adapter)
    "queue_full": 503,  # the replica's bounded queue is full: retry later
    "timeout": 504,
    "generation_failed": 500,
}


def error(code: str, message: str) -> ReplicaError:
    return ReplicaError(CODES[code], code, message)
