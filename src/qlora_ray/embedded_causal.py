"""Offline, deterministic, cached tiny causal LM for the default causal sweep.

The causal counterpart of `embedded.build_tiny_t5`, on the same corpus (`embedded.build_corpus`):

* a tokenizer trained on the corpus's train split (`embedded.train_tokenizer`: byte-level BPE, so
  code never maps to <unk>), given a BOS token, three chat-role tokens and a chat template;
* a small Llama (`LlamaForCausalLM`) pretrained briefly as a causal LM on the train split's
  sources and docstring sentences, as separate documents in shuffled order. It knows code and
  docstring English but has never seen a source followed by its own docstring, nor the
  instruction prompt below, so the base model is poor at the task and LoRA fine-tuning has
  something to learn.

The instruction view of the corpus (`instruction_pairs`, `instruction_messages`) is what a causal
trial trains on. The prompt-completion form (TRL's "prompt-completion" dataset type) is exactly::

    prompt     = "Summarize this Python definition in one sentence:\\n\\n" + source + "\\n\\nSummary:"
    completion = " " + docstring_sentence + eos_token          # eos_token is "</s>"

and the chat form ("conversational" type) is ``[{"role": "user", "content": "Summarize this Python
definition in one sentence:\\n\\n" + source}, {"role": "assistant", "content": docstring_sentence}]``,
rendered by `CHAT_TEMPLATE`::

    <s><|user|>\\n{content}\\n<|assistant|>\\n{content}</s>

(`<|system|>\\n{content}\\n` for system turns; `add_generation_prompt` appends ``<|assistant|>\\n``;
assistant turns are wrapped in ``{% generation %}`` so TRL's `assistant_only_loss` works).
The tokenizer adds BOS (never EOS) to plain text, so a tokenized prompt is always a prefix of the
tokenized prompt + completion, as TRL's completion masking needs.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from qlora_ray.embedded import (
    EOS,
    PAD,
    UNK,
    _file_lock,
    _log,
    _py_tag,
    build_corpus,
    load_corpus,
    train_tokenizer,
)

EMBEDDED_CAUSAL_MODEL = "embedded:tiny-llama"
CAUSAL_MODEL_VERSION = "v1"

BOS = "<s>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
INSTRUCTION = "Summarize this Python definition in one sentence:"
PROMPT_TEMPLATE = INSTRUCTION + "\n\n{source}\n\nSummary:"
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "<|assistant|>\n{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Small enough for a 2-core CPU. Every Linear has in_features that are multiples of 64
# (bitsandbytes 4-bit blocks); the vocabulary is padded to a multiple of 64 as well.
TINY_LLAMA_CONFIG: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
    "attention_dropout": 0.0,
    "hidden_act": "silu",
}
GENERATION_DEFAULTS: dict[str, Any] = {}
# Pretraining: 4 x 512-token rows a step (~0.23 s on 2 cores with bf16 autocast); 640 steps are ~1.65
# passes over the train split's ~790k tokens (sources, docstring sentences 3 times), ~2.5 minutes.
PRETRAIN_STEPS = 640


def causal_model_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / f"tiny-llama-stdlib-{_py_tag()}-{CAUSAL_MODEL_VERSION}"


# --------------------------------------------------------------------------- instruction view


def instruction_prompt(source: str) -> str:
    """The prompt of the prompt-completion form for one definition's source."""
    return PROMPT_TEMPLATE.format(source=source)


def _truncate(source: str, tokenizer: Any, max_tokens: int) -> str:
    """`source` cut after its first `max_tokens` tokens (at a token boundary), trailing whitespace dropped."""
    if max_tokens <= 0:
        return ""
    enc = tokenizer(source, add_special_tokens=False, return_offsets_mapping=True)
    if len(enc["input_ids"]) <= max_tokens:
        return source
    return source[: enc["offset_mapping"][max_tokens - 1][1]].rstrip()


def _fit_sources(
    rows: list[Mapping[str, Any]],
    text_column: str,
    summary_column: str,
    tokenizer: Any,
    max_length: int | None,
    length: Callable[[str, str], int],
) -> list[str]:
    """Each row's source, cut so that `length(source, summary)` (tokens of the whole training row)
    is at most `max_length`. Tokens can merge across the seams, so it cuts and re-measures."""
    sources = [str(r[text_column]) for r in rows]
    if max_length is None:
        return sources
    if tokenizer is None:
        raise ValueError("max_length needs the tokenizer")
    out = []
    for source, row in zip(sources, rows, strict=True):
        summary = str(row[summary_column])
        excess = length(source, summary) - max_length
        while excess > 0 and source:
            n = len(tokenizer(source, add_special_tokens=False)["input_ids"])
            source = _truncate(source, tokenizer, n - excess)
            excess = length(source, summary) - max_length
        out.append(source)
    return out


def instruction_pairs(
    rows: Iterable[Mapping[str, Any]],
    *,
    tokenizer: Any = None,
    max_length: int | None = None,
    text_column: str = "text",
    summary_column: str = "summary",
    eos_token: str | None = EOS,
) -> list[dict[str, str]]:
    """Corpus rows -> `{"prompt", "completion"}` rows (TRL's prompt-completion format).

    `prompt = PROMPT_TEMPLATE.format(source=text)`, `completion = " " + summary + eos_token`
    (TRL appends the tokenizer's EOS itself when a completion lacks it; pass `eos_token=None` to leave
    it to TRL). With `tokenizer` and `max_length`, each source is cut (at a token boundary) so that
    BOS + prompt + completion + EOS fits in `max_length` tokens: TRL truncates whole rows from the
    end (`truncation_mode="keep_start"`), which would cut off the completion, the only part that
    carries loss. (A completion that does not fit even after an empty source is left to TRL's
    truncation; at `max_length` >= 128 none of the corpus's does.)
    """
    rows = list(rows)

    def length(source: str, summary: str) -> int:
        return len(tokenizer(instruction_prompt(source) + " " + summary + tokenizer.eos_token)["input_ids"])

    sources = _fit_sources(rows, text_column, summary_column, tokenizer, max_length, length)
    return [
        {"prompt": instruction_prompt(source), "completion": " " + str(row[summary_column]) + (eos_token or "")}
        for source, row in zip(sources, rows, strict=True)
    ]


def instruction_messages(
    rows: Iterable[Mapping[str, Any]],
    *,
    tokenizer: Any = None,
    max_length: int | None = None,
    text_column: str = "text",
    summary_column: str = "summary",
) -> list[dict[str, list[dict[str, str]]]]:
    """Corpus rows -> `{"messages": [user, assistant]}` rows (TRL's conversational format).

    The user turn is `INSTRUCTION + "\\n\\n" + source`, the assistant turn the docstring sentence
    (no EOS: the chat template adds it). `{"prompt": messages[:1], "completion": messages[1:]}` is
    the conversational prompt-completion form. `max_length` cuts sources as in `instruction_pairs`,
    measured on the rendered chat.
    """
    rows = list(rows)

    def length(source: str, summary: str) -> int:
        text = tokenizer.apply_chat_template(_messages(source, summary), tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    sources = _fit_sources(rows, text_column, summary_column, tokenizer, max_length, length)
    return [
        {"messages": _messages(source, str(row[summary_column]))} for source, row in zip(sources, rows, strict=True)
    ]


def _messages(source: str, summary: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{INSTRUCTION}\n\n{source}"}, {"role": "assistant", "content": summary}]


# --------------------------------------------------------------------------- tokenizer


def train_causal_tokenizer(texts: list[str], vocab_size: int = 4096) -> Any:
    """`embedded.train_tokenizer`'s BPE (same corpus -> same merges as the tiny T5's), made causal.

    Ids: <pad>=0, </s>=1 (EOS), <unk>=2, BPE, T5's 100 sentinels (unused here), then <s> (BOS) and
    the role tokens. Plain text gets BOS prepended and no EOS appended; the chat template is set.
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    base = train_tokenizer(texts, vocab_size)
    backend = base.backend_tokenizer
    backend.add_special_tokens([BOS, *ROLE_TOKENS])
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=TINY_LLAMA_CONFIG["max_position_embeddings"],
        padding_side="left",  # batched generate(); TRL's collator pads training batches on the right itself
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )


# --------------------------------------------------------------------------- tiny Llama


def _pretrain_batches(
    texts: list[str],
    summaries: list[str],
    tokenizer: Any,
    *,
    passes: int,
    summary_repeats: int,
    chunk_len: int,
    batch_size: int,
    seed: int,
) -> list[Any]:
    """`passes` passes of packed causal-LM batches (`input_ids`, `chunk_len` tokens per row).

    Documents are the sources and, `summary_repeats` times, the docstring sentences, each as
    `<s> doc </s>`. Each pass shuffles them anew (so a source is never next to its own docstring
    but for chance) and packs them into `chunk_len`-token rows; a pass's incomplete last row and
    batch are dropped. Batches come out in training order.
    """
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    docs = texts + summaries * summary_repeats
    encoded = [e.ids for e in tokenizer.backend_tokenizer.encode_batch(docs, add_special_tokens=False)]
    batches = []
    for _ in range(passes):
        stream = [t for i in rng.permutation(len(docs)) for t in (bos, *encoded[i], eos)]
        n_rows = len(stream) // chunk_len
        rows = torch.tensor(stream[: n_rows * chunk_len]).view(n_rows, chunk_len)
        batches += [rows[i : i + batch_size] for i in range(0, n_rows - batch_size + 1, batch_size)]
    return batches


def build_tiny_causal(
    cache_dir: Path,
    *,
    corpus: Path | None = None,
    vocab_size: int = 4096,
    passes: int = 2,
    summary_repeats: int = 3,
    chunk_len: int = 512,
    batch_size: int = 4,
    learning_rate: float = 3e-3,
    pretrain_steps: int | None = PRETRAIN_STEPS,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Build (once) a tiny Llama pretrained on the corpus's train split; return its directory.

    The directory holds `config.json`, `generation_config.json`, `model.safetensors` and the
    tokenizer files (with the chat template), loadable with `AutoTokenizer` /
    `AutoModelForCausalLM` (also in 4 bits with bitsandbytes). Pretraining takes the first
    `pretrain_steps` batches of `_pretrain_batches` (all of them if None), with linear warmup and
    cosine decay over those steps. The weights are reproducible on one kind of CPU (bf16 autocast
    where the CPU has native bf16, fp32 elsewhere). Only the first build's arguments count: the
    cache key ignores them.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    cache_dir = Path(cache_dir)
    out = causal_model_dir(cache_dir)
    if (out / "config.json").is_file():
        return out
    with _file_lock(cache_dir / ".tiny-llama.lock"):
        if (out / "config.json").is_file():  # another process built it while we waited
            return out
        t0 = time.monotonic()
        corpus = corpus or build_corpus(cache_dir, progress=progress)
        train = load_corpus(corpus, "train")
        texts = [r["text"] for r in train]
        summaries = [r["summary"] for r in train]

        threads = torch.get_num_threads()
        torch.set_num_threads(min(2, threads))  # the budget assumes 2 cores; restored below
        try:
            tokenizer = train_causal_tokenizer(texts + summaries, vocab_size)
            batches = _pretrain_batches(
                texts,
                summaries,
                tokenizer,
                passes=passes,
                summary_repeats=summary_repeats,
                chunk_len=chunk_len,
                batch_size=batch_size,
                seed=seed,
            )
            torch.manual_seed(seed)
            config = LlamaConfig(
                vocab_size=math.ceil(len(tokenizer) / 64) * 64,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                **TINY_LLAMA_CONFIG,
            )
            model = LlamaForCausalLM(config)
            steps = pretrain_steps or len(batches)
            _log(
                progress,
                f"pretraining a tiny Llama ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
                f"tokenizer: {len(tokenizer)} tokens) for {steps} steps of {batch_size}x{chunk_len} tokens: causal LM",
            )
            _pretrain(model, batches, steps, learning_rate, progress)
        finally:
            torch.set_num_threads(threads)

        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **GENERATION_DEFAULTS,
        )
        tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{out.name}."))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            for path in [tmp, *tmp.iterdir()]:  # mkdtemp makes it private; it is a shared cache
                path.chmod(0o755 if path.is_dir() else 0o644)
            if out.exists():  # a stale, incomplete directory (no config.json)
                shutil.rmtree(out)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _log(progress, f"built the tiny Llama in {time.monotonic() - t0:.0f}s -> {out}")
    return out


def _pretrain(model: Any, batches: list[Any], steps: int, lr: float, progress: bool) -> None:
    import torch

    # bf16 autocast is ~1.7x faster on CPUs with native bf16 (weights and optimizer stay fp32).
    bf16 = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:  # linear warmup, then cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    log_every = max(1, steps // 10)
    losses: list[float] = []
    t0 = time.monotonic()
    model.train()
    for step in range(steps):
        input_ids = batches[step % len(batches)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            elapsed = time.monotonic() - t0
            _log(progress, f"  step {step + 1}/{steps}  loss {sum(losses) / len(losses):.3f}  {elapsed:.0f}s")
            losses.clear()
    model.eval()
