"""The batching engine of a model replica: one thread decodes every in-flight row together.

Rows (one prompt x one choice each) wait in a bounded queue and join the running batch
between decoding steps (continuous batching): a joining group is encoded in one call,
then every active row advances one token per step, whatever its adapter, position or
sampling settings. A finished row leaves at once and its cache row is reused.

Everything that touches the model runs on the engine thread; other threads hand it work
through `call` (adapter installs) and `submit` (rows). Rows report back through a
callback that the replica turns into asyncio events.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from qlora_ray.serving.causal_runner import CausalRunner
from qlora_ray.serving.multi_lora import SlotContext
from qlora_ray.serving.t5_runner import T5Runner

logger = logging.getLogger("ray.serve")


# Rows encoded together when batch-invariant (a fixed shape; short groups are padded with copies).
# On a GPU a whole batch: the encoder call is bound by kernel launches, not by its rows.
CPU_PREFILL_GROUP = 4


def runner_class(model) -> type[T5Runner] | type[CausalRunner]:
    return T5Runner if getattr(model.config, "is_encoder_decoder", False) else CausalRunner


def compute_dtype(model) -> torch.dtype:
    """What the engine decodes in (caches, LoRA slots): the dtype of the model's last norm."""
    return runner_class(model).final_norm_of(model).weight.dtype


class QueueFull(RuntimeError):
    pass


@dataclass
class Row:
    input_ids: list[int]
    slot: int  # LoRA slot (0: the bare base)
    max_new_tokens: int
    on_event: Callable[[Row, str, bool], None]  # (row, new text, finished) from the engine thread
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # generate max_new_tokens whatever comes (benchmarks)
    # Filled in by the engine:
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of `text` already reported
    finish_reason: str | None = None  # "stop", "length", or "error"
    error: str | None = None
    cancelled: bool = False
    generator: torch.Generator | None = None


class Engine:
    def __init__(self, model, tokenizer, ctx: SlotContext, *, max_rows: int, max_source: int, max_new: int,
                 max_queued: int, cuda_graphs: bool, batch_invariant: bool = True):
        self.model, self.tokenizer, self.ctx = model, tokenizer, ctx
        # Batch invariance: every step and every encoder call has the same shapes whatever the
        # batch holds, so each row's arithmetic, and its output, is the same bit for bit as
        # when it is decoded alone (GPU kernels pick their algorithm by shape).
        self.batch_invariant = batch_invariant
        self.runner = runner_class(model)(model, max_rows, max_source, max_new)
        self.device, self.max_rows, self.max_queued = self.runner.device, max_rows, max_queued
        gen = model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else model.config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])
        self.heads: dict[int, torch.Tensor] = {}  # slot -> the adapter's own lm_head weight (modules_to_save)
        self.head_bias = model.lm_head.bias  # Phi's lm_head has one; a saved head keeps the base's
        vocab = model.lm_head.out_features
        long = {"device": self.device, "dtype": torch.long}
        self.tokens = torch.zeros(max_rows, **long)  # each cache row's last token
        self.positions = torch.zeros(max_rows, **long)
        self.slots = torch.zeros(max_rows, **long)
        self.penalty = torch.ones(max_rows, device=self.device)
        self.seen = torch.zeros(max_rows, vocab, dtype=torch.bool, device=self.device)  # for repetition_penalty
        self.active: list[Row] = []  # active[i] lives in cache row i
        self.source_lens: list[int] = []
        self.queue: collections.deque[Row] = collections.deque()
        self.calls: collections.deque = collections.deque()
        self.wake = threading.Condition()
        self.graphs = CudaGraphs(self) if cuda_graphs and self.device.type == "cuda" else None
        self.steps = 0
        self.running = True
        self.thread = threading.Thread(target=self._loop, name="qlora-ray-engine", daemon=True)
        self.thread.start()

    # ---- called from other threads ----

    def submit(self, rows: list[Row]) -> None:
        for r in rows:  # what would index outside the static buffers (a device-side assert on CUDA)
            if not 0 < len(r.input_ids) <= self.runner.max_source:
                raise ValueError(f"a row needs 1 to {self.runner.max_source} input tokens, got {len(r.input_ids)}")
            if not 1 <= r.max_new_tokens <= self.runner.max_new:
                raise ValueError(f"max_new_tokens must be 1 to {self.runner.max_new}, got {r.max_new_tokens}")
            if not 0 <= r.slot < self.ctx.capacity:
                raise ValueError(f"no LoRA slot {r.slot}")
        with self.wake:
            if len(self.queue) + len(rows) > self.max_queued:
                raise QueueFull(f"{len(self.queue)} rows are waiting; the limit is {self.max_queued}")
            self.queue.extend(rows)
            self.wake.notify()

    def call(self, fn: Callable) -> concurrent.futures.Future:
        """Run fn() on the engine thread between two steps."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.wake:
            self.calls.append((fn, future))
            self.wake.notify()
        return future

    def close(self) -> None:
        with self.wake:
            self.running = False
            self.wake.notify()
        self.thread.join(timeout=10)

    def load(self) -> dict:
        return {"active_rows": len(self.active), "queued_rows": len(self.queue), "steps": self.steps}

    # ---- the engine thread ----

    def _loop(self) -> None:
        while True:
            with self.wake:
                while self.running and not (self.calls or self.queue or self.active):
                    self.wake.wait()
                if not self.running:
                    return
                calls = list(self.calls)
                self.calls.clear()
                room = self.max_rows - len(self.active)
                joining = []
                while self.queue and len(joining) < room:
                    row = self.queue.popleft()
                    if not row.cancelled:
                        joining.append(row)
            for fn, future in calls:
                try:
                    future.set_result(fn())
                except BaseException as e:  # reported to the caller
                    future.set_exception(e)
            try:
                if joining:
                    self._join(joining)
                if self.active:
                    self._step()
            except Exception as e:  # a step failed (e.g. out of memory): fail its rows, keep serving
                logger.exception("decoding step failed")
                for row in self.active:
                    self._fail(row, f"generation failed: {type(e).__name__}: {e}")
                self._drop_all()

    def _join(self, rows: list[Row]) -> None:
        try:
            self._prefill(rows)
        except Exception as e:
            if len(rows) == 1:
                self._fail(rows[0], f"generation failed: {type(e).__name__}: {e}")
                return
            for row in rows:  # find the row that fails; the others join
                self._join([row])

    @torch.no_grad()
    def _prefill(self, rows: list[Row]) -> None:
        n0, n = len(self.active), len(rows)
        if self.batch_invariant:  # fixed groups of rows x max_source tokens
            group = self.max_rows if self.device.type == "cuda" else min(CPU_PREFILL_GROUP, self.max_rows)
            for start in range(0, n, group):
                chunk = rows[start : start + group]
                self._encode(n0 + start, chunk + [chunk[-1]] * (group - len(chunk)), len(chunk),
                             self.runner.max_source)
        else:
            self._encode(n0, rows, n, max(len(r.input_ids) for r in rows))
        index = slice(n0, n0 + n)
        starts = [self.runner.begin(r.input_ids) for r in rows]
        self.tokens[index] = torch.tensor([token for token, _, _ in starts], device=self.device)
        self.positions[index] = torch.tensor([position for _, position, _ in starts], device=self.device)
        self.slots[index] = torch.tensor([r.slot for r in rows], device=self.device)
        self.penalty[index] = torch.tensor([r.repetition_penalty for r in rows], device=self.device)
        self.seen[index] = False
        for i, (_, _, seen) in enumerate(starts):
            self.seen[n0 + i, seen] = True
        for r in rows:
            if r.temperature > 0:
                r.generator = torch.Generator(self.device)
                if r.seed is not None:
                    r.generator.manual_seed(r.seed)
                else:
                    r.generator.seed()
        self.active.extend(rows)
        self.source_lens.extend(len(r.input_ids) for r in rows)

    def _encode(self, first_row: int, rows: list[Row], keep: int, length: int) -> None:
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.full((len(rows), length), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r.input_ids)] = torch.tensor(r.input_ids)
            mask[i, : len(r.input_ids)] = 1
        self.ctx.rows = torch.tensor([r.slot for r in rows], device=self.device)
        self.runner.prefill(list(range(first_row, first_row + keep)), ids.to(self.device), mask.to(self.device))

    @torch.no_grad()
    def _step(self) -> None:
        n = len(self.active)
        width = self.max_rows if self.batch_invariant else n  # rows computed
        if self.graphs is not None:
            hidden = self.graphs.step(width)
        elif self.batch_invariant:
            self.ctx.rows = self.slots
            hidden = self.runner.step(self.tokens, self.positions)
        else:
            self.ctx.rows = self.slots[:n]
            key_len = int(self.positions[:n].max()) + 1
            hidden = self.runner.step(self.tokens[:n], self.positions[:n], key_len, max(self.source_lens))
        self.ctx.rows = self.slots[:width]
        logits = self.model.lm_head(hidden).float()
        own_heads = {r.slot for r in self.active if r.slot in self.heads}
        for slot in own_heads:
            index = torch.tensor([i for i, r in enumerate(self.active) if r.slot == slot], device=self.device)
            if self.batch_invariant:  # row by row: one shape, however many rows share the adapter
                for i in index.tolist():
                    logits[i] = F.linear(hidden[i : i + 1], self.heads[slot], self.head_bias).float()[0]
            else:
                logits[index] = F.linear(hidden.index_select(0, index), self.heads[slot], self.head_bias).float()
        logits = logits[:n]
        # repetition_penalty, as transformers applies it: seen tokens' logits shrink toward 0... or below it
        penalty = self.penalty[:n, None]
        penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
        logits = torch.where(self.seen[:n], penalized, logits)
        chosen = logits.argmax(dim=-1)
        for i, r in enumerate(self.active):
            if r.temperature > 0:
                chosen[i] = _sample(logits[i], r.temperature, r.top_p, r.generator)
        rows = torch.arange(n, device=self.device)
        self.tokens[:n] = chosen
        self.positions[:n] += 1
        self.seen[rows, chosen] = True
        self.steps += 1
        finished = []
        for i, (r, token) in enumerate(zip(self.active, chosen.tolist(), strict=True)):
            if r.cancelled:
                r.finish_reason = "cancelled"
            elif token in self.eos and not r.ignore_eos:
                r.finish_reason = "stop"
            else:
                r.tokens.append(token)
                if len(r.tokens) >= r.max_new_tokens:
                    r.finish_reason = "length"
            if r.finish_reason != "cancelled":
                self._report(r)
            if r.finish_reason:
                finished.append(i)
        for i in reversed(finished):
            self._remove(i)

    def _report(self, row: Row) -> None:
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        if row.stop:
            cut = min((i for i in (text.find(s, max(0, row.emitted - len(s))) for s in row.stop) if i >= 0),
                      default=-1)
            if cut >= 0:
                text, row.finish_reason = text[:cut], "stop"
        row.text = text
        safe = len(text)
        if not row.finish_reason:  # hold back what could still become a stop string or a split character
            if row.stop:
                safe -= max(len(s) for s in row.stop) - 1
            while safe > 0 and text[safe - 1] == "\ufffd":
                safe -= 1
        if safe > row.emitted or row.finish_reason:
            new = text[row.emitted : max(safe, row.emitted)]
            row.emitted = max(safe, row.emitted)
            row.on_event(row, new, bool(row.finish_reason))

    def _fail(self, row: Row, message: str) -> None:
        row.finish_reason, row.error = "error", message
        row.on_event(row, "", True)

    def _remove(self, i: int) -> None:
        last = len(self.active) - 1
        if i != last:
            self.runner.move_row(last, i)
            for t in (self.tokens, self.positions, self.slots, self.penalty, self.seen):
                t[i] = t[last]
            self.active[i], self.source_lens[i] = self.active[last], self.source_lens[last]
        # A free cache row stays valid for a captured step: position 0, the base's slot.
        self.tokens[last], self.positions[last], self.slots[last] = 0, 0, 0
        self.active.pop()
        self.source_lens.pop()

    def _drop_all(self) -> None:
        self.active.clear()
        self.source_lens.clear()
        self.tokens.zero_()
        self.positions.zero_()
        self.slots.zero_()


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        return order[torch.multinomial(sorted_probs, 1, generator=generator)[0]]
    return torch.multinomial(probs, 1, generator=generator)[0]


class CudaGraphs:
    """The decode step for the first b cache rows, captured once per bucket size b.

    The step reads tokens, positions and slots from the engine's persistent tensors (the
    graph captures their addresses), so a replay needs no copies; rows past n in a bucket
    are free rows at position 0 whose outputs are ignored. Captures are dropped when a
    LoRA wrapper reallocates (SlotContext.version).
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self.buckets = sorted({min(2**i, engine.max_rows) for i in range(engine.max_rows.bit_length() + 1)})
        if engine.batch_invariant:
            self.buckets = [engine.max_rows]
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.version = -1
        self.pool = None
        self.failed = False

    def step(self, n: int) -> torch.Tensor:
        e = self.engine
        if self.failed:
            e.ctx.rows = e.slots[:n]
            return e.runner.step(e.tokens[:n], e.positions[:n])
        if self.version != e.ctx.version:
            self.graphs.clear()
            self.pool = torch.cuda.graph_pool_handle()
            self.version = e.ctx.version
        bucket = next(b for b in self.buckets if b >= n)
        if bucket not in self.graphs:
            try:
                self.graphs[bucket] = self._capture(bucket)
            except Exception:
                logger.exception("CUDA graph capture failed; decoding eagerly")
                self.failed = True
                return self.step(n)
        graph, out = self.graphs[bucket]
        graph.replay()
        return out[:n]

    def capture_all(self) -> float:
        """Capture every bucket now (engine thread, between steps), largest first to share one pool."""
        start = time.perf_counter()
        for bucket in reversed(self.buckets):
            if not self.failed:
                self.step(bucket)
        return time.perf_counter() - start

    def _capture(self, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        e = self.engine
        e.ctx.rows = e.slots[:bucket]
        tokens, positions = e.tokens[:bucket], e.positions[:bucket]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: rewrites the same cache entries the real step writes
            for _ in range(2):
                e.runner.step(tokens, positions)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = e.runner.step(tokens, positions)
        return graph, out
