"""Greedy generation for a seq2seq trial's ROUGE evaluation, through the serving engine's T5 decode step.

ROUGE needs generated summaries, and transformers' `generate` decodes T5 one token at a time
through Python and hundreds of small kernel launches: on an H100 a T5-3b evaluation step
kept the GPU ~10% busy (bench/results/gpu_sweep). The serving engine's `T5Runner` already
decodes with static per-row caches, so its step has fixed shapes: on a GPU it is captured
once per evaluation as a CUDA graph (with the LM head and the greedy choice) and replayed
per token. Outputs are the same tokens `generate(num_beams=1)` picks (tests/test_eval_generation.py).

Used only where it gives the same answer: T5-family models, greedy, and a generation config
that asks for nothing beyond max length, EOS and a repetition penalty (see `supports`);
otherwise `generate` runs.
"""

from __future__ import annotations

import logging

import torch

from qlora_ray.serving.t5_runner import SUPPORTED, T5Runner

logger = logging.getLogger(__name__)

# Generation settings whose non-default values change greedy output: the fast path declines them.
# (repetition_penalty is applied, as the engine applies it.)
_NEUTRAL = {"no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
            "min_length": 0, "min_new_tokens": None, "bad_words_ids": None, "suppress_tokens": None,
            "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
            "length_penalty": 1.0, "exponential_decay_length_penalty": None, "sequence_bias": None,
            "do_sample": False, "num_return_sequences": 1}


def supports(model, num_beams: int) -> bool:
    """Whether `GreedyT5Generator` reproduces `model.generate(num_beams=num_beams)` for this model."""
    config = getattr(model, "config", None)
    if num_beams != 1 or getattr(config, "model_type", None) not in SUPPORTED:
        return False
    gen = getattr(model, "generation_config", None)
    return gen is None or all(_neutral(getattr(gen, name, None), default) for name, default in _NEUTRAL.items())


def _neutral(value, default) -> bool:
    return value is None or value == default or (default is None and not value)


class GreedyT5Generator:
    """Greedy decoding of up to `max_rows` sources at once, `max_new` tokens each.

    Rows are decoded in lockstep (one evaluation batch), so one position serves all rows.
    On a GPU the per-token work (decoder step, LM head, argmax, feeding the token back) is one
    CUDA graph replay; the graph is captured per generator, so build one per evaluation: the
    adapter's weights change between evaluations only in place, but a fresh capture keeps
    nothing from one evaluation alive in the next.
    """

    def __init__(self, model, *, max_rows: int, max_source: int, max_new: int, cuda_graph: bool = True):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.model = base
        self.runner = T5Runner(base, max_rows, max_source, max_new)
        self.device, self.max_rows, self.max_new = self.runner.device, max_rows, max_new
        gen = base.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else base.config.eos_token_id
        self.eos = torch.tensor(eos if isinstance(eos, list) else [eos], device=self.device)
        pad = gen.pad_token_id if gen.pad_token_id is not None else base.config.pad_token_id
        self.pad = int(pad if pad is not None else 0)
        self.start = int(base.config.decoder_start_token_id)
        self.penalty = float(gen.repetition_penalty or 1.0)
        long = {"device": self.device, "dtype": torch.long}
        self.tokens = torch.full((max_rows,), self.start, **long)
        self.positions = torch.zeros(max_rows, **long)
        # tokens each row has produced (the decoder start included, as transformers counts it): for the penalty
        self.seen = torch.zeros(max_rows, base.lm_head.out_features, dtype=torch.bool, device=self.device)
        self.use_graph = cuda_graph and self.device.type == "cuda"
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_out: torch.Tensor | None = None

    def close(self) -> None:
        """Let go of the static caches and the captured graph (and its memory pool)."""
        self.graph = self.graph_out = self.runner = self.seen = None

    def _advance(self) -> torch.Tensor:
        """One token for every row: the greedy choice is written back as the next step's input."""
        hidden = self.runner.step(self.tokens, self.positions)
        logits = self.model.lm_head(hidden).float()  # generate() scores in fp32 too
        if self.penalty != 1.0:  # transformers' RepetitionPenaltyLogitsProcessor
            penalized = torch.where(logits < 0, logits * self.penalty, logits / self.penalty)
            logits = torch.where(self.seen, penalized, logits)
        chosen = logits.argmax(dim=-1)
        self.seen.scatter_(1, chosen[:, None], True)
        self.tokens.copy_(chosen)
        self.positions.add_(1)
        return chosen

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[n, max_new + 1] token ids: the decoder start, the summary, EOS, then padding (as `generate`)."""
        n = input_ids.shape[0]
        if n > self.max_rows:
            raise ValueError(f"{n} rows, the generator was built for {self.max_rows}")
        ids, mask = input_ids.to(self.device), attention_mask.to(self.device)
        if n < self.max_rows:  # a fixed batch for the captured step: the missing rows repeat the last one
            fill = self.max_rows - n
            ids = torch.cat([ids, ids[-1:].expand(fill, -1)])
            mask = torch.cat([mask, mask[-1:].expand(fill, -1)])
        self.runner.prefill(list(range(self.max_rows)), ids, mask)
        self.tokens.fill_(self.start)
        self.positions.zero_()
        self.seen.zero_()
        self.seen[:, self.start] = True
        out = torch.full((self.max_rows, self.max_new + 1), self.pad, dtype=torch.long, device=self.device)
        out[:, 0] = self.start
        done = torch.zeros(self.max_rows, dtype=torch.bool, device=self.device)
        done[n:] = True
        for t in range(self.max_new):
            chosen = self._step()
            out[:, t + 1] = torch.where(done, self.pad, chosen)
            done |= torch.isin(chosen, self.eos)
            if t % 8 == 7 and bool(done.all()):  # a host sync now and then, not every token
                break
        return out[:n]

    def _step(self) -> torch.Tensor:
        if not self.use_graph:
            return self._advance()
        if self.graph is None:
            try:
                self.graph, self.graph_out = self._capture()
            except Exception:  # correctness does not depend on the graph
                logger.exception("CUDA graph capture of the evaluation decode step failed; decoding eagerly")
                self.use_graph = False
                return self._advance()
        self.graph.replay()
        return self.graph_out

    def _capture(self):
        # The warm-up and the capture run the step three times: the inputs are put back as they were after,
        # also when capture fails (the caller then decodes eagerly from the same state).
        tokens, positions, seen = self.tokens.clone(), self.positions.clone(), self.seen.clone()
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up on a side stream, as CUDA graph capture requires
                for _ in range(2):
                    self._advance()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._advance()
            return graph, out
        finally:
            self.tokens.copy_(tokens)
            self.positions.copy_(positions)
            self.seen.copy_(seen)
