"""Offline, deterministic, cached builders for the default sweep: a corpus and a tiny T5.

The default sweep must run without any model or dataset hub, so both are built locally:

* a summarization corpus of (function/class source without its docstring -> first sentence
  of the docstring) pairs, mined with `ast` from the running Python's standard library, split
  by module into train and eval;
* a tiny T5 whose tokenizer is trained on that corpus's train split, briefly pretrained on it
  with T5 span corruption plus a prefix-LM objective on docstring sentences alone. It knows
  code and docstring English but has never seen code paired with its docstring, so the base
  model scores ~0 on the task and LoRA fine-tuning has something to learn.

Both are written atomically under a versioned cache directory and reused afterwards.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import hashlib
import inspect
import itertools
import json
import math
import os
import re
import shutil
import sys
import sysconfig
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CORPUS_VERSION = "v1"
MODEL_VERSION = "v2"
# Directories of the stdlib that hold tests, tools, vendored or generated code.
SKIP_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idlelib",
        "lib2to3",
        "turtledemo",
        "__pycache__",
        "ensurepip",
        "lib-dynload",
        "pydoc_data",
        "encodings",
        "__phello__",
    }
)
MIN_SUMMARY_WORDS = 3
MAX_SUMMARY_WORDS = 30
MIN_TEXT_LINES = 2
MAX_TEXT_CHARS = 2000
EVAL_MODULE_PERCENT = 10


def default_cache_dir() -> Path:
    """`$QLORA_RAY_CACHE` if set, else `~/.cache/qlora-ray`."""
    env = os.environ.get("QLORA_RAY_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qlora-ray"


def _py_tag() -> str:
    return f"py{sys.version_info.major}{sys.version_info.minor}"


def corpus_path(cache_dir: Path) -> Path:
    return Path(cache_dir) / f"stdlib-docstrings-{_py_tag()}-{CORPUS_VERSION}" / "corpus.jsonl"


def model_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / f"tiny-t5-stdlib-{_py_tag()}-{MODEL_VERSION}"


def _log(progress: bool, msg: str) -> None:
    if progress:
        print(f"[qlora-ray] {msg}", file=sys.stderr, flush=True)


def _sha1_int(s: str) -> int:
    return int.from_bytes(hashlib.sha1(s.encode("utf-8")).digest()[:8], "big")


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock, so concurrent first runs build once instead of colliding."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- corpus


def _summary_of(docstring: str) -> str | None:
    """First sentence of the docstring's first paragraph, whitespace-collapsed, ending in '.'."""
    paragraph = re.split(r"\n\s*\n", inspect.cleandoc(docstring).strip(), maxsplit=1)[0]
    paragraph = " ".join(paragraph.split())
    if not paragraph or ">>>" in paragraph:
        return None
    match = re.search(r"[.!?]\s", paragraph + " ")
    sentence = paragraph[: match.start()] if match else paragraph
    sentence = sentence.rstrip(" .:;,") + "."
    n_words = len(sentence.split())
    if not MIN_SUMMARY_WORDS <= n_words <= MAX_SUMMARY_WORDS:
        return None
    return sentence


def _text_without_docstring(
    lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef, doc: ast.Expr
) -> str | None:
    """Dedented source of `node` with the docstring statement's lines removed.

    Works on whole lines: the docstring must own its lines (nothing else on them but
    whitespace, a trailing ';' or a comment); definitions where it does not are skipped.
    """
    start, end = node.lineno - 1, node.end_lineno  # decorators are left out on purpose
    first = lines[start]
    if first[: node.col_offset].strip():  # e.g. `if x: def f(): ...` on one line
        return None
    d_start, d_end = doc.lineno - 1, doc.end_lineno - 1
    if lines[d_start][: doc.col_offset].strip():  # one-liner `def f(): "doc"; ...`
        return None
    rest = lines[d_end][doc.end_col_offset :].strip()
    if rest and not (rest.startswith("#") or rest == ";"):
        return None
    kept = lines[start:d_start] + lines[d_end + 1 : end]
    return textwrap.dedent("\n".join(kept)).strip("\n")


def _iter_stdlib_files(stdlib: Path) -> Iterator[tuple[str, Path]]:
    """(module name, path) for every stdlib .py file outside SKIP_DIRS, in sorted order."""
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith(("config-", ".")))
        for name in sorted(files):
            if not name.endswith(".py") or name.startswith("_sysconfigdata"):
                continue
            path = Path(root) / name
            parts = list(path.relative_to(stdlib).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            yield ".".join(parts), path


def _pairs_in_module(module: str, source: str) -> Iterator[dict[str, str]]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    lines = source.splitlines()

    def walk(body: list[ast.stmt], prefix: str) -> Iterator[dict[str, str]]:
        for node in body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            qualname = f"{prefix}{node.name}"
            yield from walk(node.body, f"{qualname}.")
            first = node.body[0]
            doc = ast.get_docstring(node, clean=False)
            # A body that is only a docstring would leave a bodiless `def`.
            if doc is None or len(node.body) < 2 or not isinstance(first, ast.Expr):
                continue
            summary = _summary_of(doc)
            if summary is None:
                continue
            text = _text_without_docstring(lines, node, first)
            if text is None or len(text) > MAX_TEXT_CHARS:
                continue
            if sum(1 for line in text.splitlines() if line.strip()) < MIN_TEXT_LINES:
                continue
            yield {"text": text, "summary": summary, "name": f"{module}.{qualname}", "module": module}

    yield from walk(tree.body, "")


def split_of(module: str) -> str:
    """Stable per-module split: ~10% of modules are held out for evaluation."""
    return "eval" if _sha1_int(f"split:{module}") % 100 < EVAL_MODULE_PERCENT else "train"


def iter_stdlib_pairs(stdlib: Path | None = None) -> Iterator[dict[str, str]]:
    """Every usable (text, summary) pair of the stdlib, de-duplicated by text, in source order."""
    stdlib = Path(stdlib or sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    for module, path in _iter_stdlib_files(stdlib):
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        split = split_of(module)
        for pair in _pairs_in_module(module, source):
            if pair["text"] in seen:
                continue
            seen.add(pair["text"])
            yield {**pair, "split": split}


def _atomic_write_text(path: Path, data: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def build_corpus(cache_dir: Path, *, max_pairs: int = 6000, progress: bool = True) -> Path:
    """Build (once) the stdlib docstring summarization corpus; return its JSONL path.

    Records are `{"text", "summary", "name": "module.qualname", "module", "split"}` in a
    stable hash order (any prefix is a fair sample); beyond `max_pairs`, the first `max_pairs`
    in that order are kept. The file is cached per Python minor version; `max_pairs` only
    matters for the build that creates it.
    """
    path = corpus_path(cache_dir)
    if path.is_file():
        return path
    with _file_lock(Path(cache_dir) / ".corpus.lock"):
        if path.is_file():  # another process built it while we waited
            return path
        t0 = time.monotonic()
        pairs = sorted(iter_stdlib_pairs(), key=lambda p: (_sha1_int(f"order:{p['name']}\0{p['text']}"), p["name"]))
        pairs = pairs[:max_pairs]
        lines = "".join(json.dumps(p, ensure_ascii=False, sort_keys=True) + "\n" for p in pairs)
        _atomic_write_text(path, lines)
        n_eval = sum(p["split"] == "eval" for p in pairs)
        _log(
            progress,
            f"built corpus: {len(pairs)} pairs ({len(pairs) - n_eval} train, {n_eval} eval) "
            f"in {time.monotonic() - t0:.1f}s -> {path}",
        )
    return path


def load_corpus(path: Path, split: str | None = None) -> list[dict[str, str]]:
    """Records of a corpus JSONL file, optionally only one split."""
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if split is None or r["split"] == split]


# --------------------------------------------------------------------------- tokenizer

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"
NUM_SENTINELS = 100


def train_tokenizer(texts: list[str], vocab_size: int = 4096) -> Any:
    """A byte-level BPE tokenizer with T5's special-token layout, as a HF fast tokenizer.

    Byte-level so that code never maps to <unk>, and whitespace runs (indentation, newlines)
    survive as tokens. Ids: <pad>=0, </s>=1, <unk>=2, then BPE, then <extra_id_99..0> last,
    as in T5 (extra_id_0 has the highest id).
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - NUM_SENTINELS,
        special_tokens=[PAD, EOS, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    sentinels = [f"<extra_id_{i}>" for i in reversed(range(NUM_SENTINELS))]
    tok.add_special_tokens(sentinels)
    # T5 appends </s> to every sequence (and the summarization labels rely on it).
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, tok.token_to_id(EOS))]
    )
    assert (tok.token_to_id(PAD), tok.token_to_id(EOS), tok.token_to_id(UNK)) == (0, 1, 2)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=sorted(sentinels, key=lambda s: int(s[10:-1])),
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


# --------------------------------------------------------------------------- tiny T5

# Small enough for a 2-core CPU: a 4-bit LoRA step at batch 8 takes ~0.15 s on one thread.
# Every Linear has in_features that are multiples of 64 (bitsandbytes 4-bit blocks).
TINY_T5_CONFIG: dict[str, Any] = {
    "d_model": 128,
    "d_ff": 512,
    "d_kv": 32,
    "num_heads": 4,
    "num_layers": 4,
    "num_decoder_layers": 4,
    "feed_forward_proj": "relu",  # original T5 FFN: `wi` / `wo`
    # transformers 5 always ties lm_head to the shared embedding; False only turns off T5 v1.0's
    # d_model**-0.5 output scaling (as in T5 v1.1). LoRA's modules_to_save=["lm_head"] trains a copy.
    "tie_word_embeddings": False,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "dropout_rate": 0.0,  # pretraining is far too short to overfit
    "layer_norm_epsilon": 1e-6,
}
# A 4-bit tiny model decoded greedily falls into loops ("the the the ..."); a mild
# repetition penalty is the shipped default (callers can override it per generate() call).
GENERATION_DEFAULTS: dict[str, Any] = {"repetition_penalty": 1.3}
NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN = 3.0


def _segment(rng: Any, n: int, k: int) -> list[int]:
    """Random split of n items into k non-empty segments (their lengths)."""
    cuts = sorted(int(c) + 1 for c in rng.choice(n - 1, size=k - 1, replace=False)) if k > 1 else []
    bounds = [0, *cuts, n]
    return [b - a for a, b in itertools.pairwise(bounds)]


def span_corrupt(tokens: list[int], rng: Any, sentinel_ids: list[int], eos_id: int) -> tuple[list[int], list[int]]:
    """T5 span corruption: noise spans (15% of tokens, mean length 3) become one sentinel each
    in the input and `<sentinel> span...` in the target; both end in eos."""
    n = len(tokens)
    num_noise = min(max(round(n * NOISE_DENSITY), 1), n - 1)
    num_spans = max(round(num_noise / MEAN_NOISE_SPAN), 1)
    noise_lens = _segment(rng, num_noise, num_spans)
    keep_lens = _segment(rng, n - num_noise, num_spans)
    inputs: list[int] = []
    targets: list[int] = []
    pos = 0
    for i, (keep, noise) in enumerate(zip(keep_lens, noise_lens, strict=True)):
        inputs += tokens[pos : pos + keep]
        pos += keep
        inputs.append(sentinel_ids[i])
        targets.append(sentinel_ids[i])
        targets += tokens[pos : pos + noise]
        pos += noise
    return inputs + [eos_id], targets + [eos_id]


def prefix_lm(tokens: list[int], rng: Any, eos_id: int) -> tuple[list[int], list[int]]:
    """T5's prefix-LM objective: the input is a prefix (at least one token, at most half of the
    document), the target is the rest; no sentinels."""
    k = int(rng.integers(1, max(1, len(tokens) // 2) + 1))
    return tokens[:k] + [eos_id], tokens[k:] + [eos_id]


def _collate(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[Any, Any]:
    import torch

    def pad(rows: list[list[int]], value: int) -> Any:
        width = max(len(r) for r in rows)
        return torch.tensor([r + [value] * (width - len(r)) for r in rows])

    return pad([x for x, _ in pairs], pad_id), pad([y for _, y in pairs], -100)


def _pretrain_batches(
    texts: list[str],
    summaries: list[str],
    tokenizer: Any,
    *,
    span_corruption_fraction: float,
    chunk_len: int,
    batch_size: int,
    summary_lm_repeats: int,
    summary_lm_batch_size: int,
    seed: int,
) -> list[tuple[Any, Any]]:
    """One pass of (input_ids, labels) batches, of two kinds:

    * span corruption of all documents (texts and summaries, shuffled, each + eos) packed into
      `chunk_len`-token chunks, of which a `span_corruption_fraction` is kept. Shuffling keeps
      each text away from its own summary: pretraining never sees the code -> docstring pairing
      that fine-tuning is meant to learn;
    * prefix LM on single summaries (English prefix -> rest of the sentence, never code),
      `summary_lm_repeats` times with fresh split points. Span corruption alone gives the
      decoder ~15% of the few summary tokens as targets: far too little to learn docstring
      English in a CPU-minute. Without this the LoRA fine-tune only learns unigram statistics
      within its budget (ROUGE-L ~0.05); with it, ~0.15.

    Batches are of one kind each and summaries are length-sorted, so little goes to padding.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    sentinels = tokenizer.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(NUM_SENTINELS)])
    encode = tokenizer.backend_tokenizer.encode_batch

    docs = texts + summaries
    order = rng.permutation(len(docs))
    stream = [t for e in encode([docs[i] for i in order], add_special_tokens=False) for t in (*e.ids, eos)]
    chunks = [stream[i : i + chunk_len] for i in range(0, len(stream) - chunk_len + 1, chunk_len)]
    chunks = chunks[: round(len(chunks) * span_corruption_fraction)]  # a random subset: shuffled
    pairs = [span_corrupt(c, rng, sentinels, eos) for c in chunks]
    batches = [_collate(pairs[i : i + batch_size], pad) for i in range(0, len(pairs), batch_size)]

    summary_ids = [e.ids for e in encode(summaries, add_special_tokens=False) if len(e.ids) >= 2]
    for _ in range(summary_lm_repeats):
        pairs = [prefix_lm(summary_ids[i], rng, eos) for i in rng.permutation(len(summary_ids))]
        pairs.sort(key=lambda p: len(p[1]))
        step = summary_lm_batch_size
        batches += [_collate(pairs[i : i + step], pad) for i in range(0, len(pairs), step)]
    return batches


def build_tiny_t5(
    cache_dir: Path,
    *,
    corpus: Path | None = None,
    vocab_size: int = 4096,
    span_corruption_fraction: float = 0.3,
    chunk_len: int = 128,
    batch_size: int = 32,
    summary_lm_repeats: int = 6,
    summary_lm_batch_size: int = 64,
    learning_rate: float = 3e-3,
    pretrain_steps: int | None = None,
    pretrain_seconds_budget: float | None = None,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Build (once) a tiny T5 pretrained on the corpus's train split; return its directory.

    The directory holds `config.json`, `generation_config.json`, `model.safetensors` and
    tokenizer files, loadable with `AutoTokenizer` / `AutoModelForSeq2SeqLM` (also in 4 bits
    with bitsandbytes). Pretraining is one pass over the batches of `_pretrain_batches`
    (~525 steps, ~60 s on 2 CPU cores), or `pretrain_steps` if given. A
    `pretrain_seconds_budget` stops it early (for experiments: the result then depends on
    the machine's speed, so the default build has none). Only the first build's arguments
    count: the cache key ignores them.
    """
    import torch
    from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration

    cache_dir = Path(cache_dir)
    out = model_dir(cache_dir)
    if (out / "config.json").is_file():
        return out
    with _file_lock(cache_dir / ".tiny-t5.lock"):
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
            tokenizer = train_tokenizer(texts + summaries, vocab_size)
            batches = _pretrain_batches(
                texts,
                summaries,
                tokenizer,
                span_corruption_fraction=span_corruption_fraction,
                chunk_len=chunk_len,
                batch_size=batch_size,
                summary_lm_repeats=summary_lm_repeats,
                summary_lm_batch_size=summary_lm_batch_size,
                seed=seed,
            )
            torch.manual_seed(seed)
            config = T5Config(
                vocab_size=math.ceil(len(tokenizer) / 64) * 64,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                decoder_start_token_id=tokenizer.pad_token_id,
                **TINY_T5_CONFIG,
            )
            model = T5ForConditionalGeneration(config)
            # HF initializes the (tied) embedding with std 1; without output scaling that means
            # logits of std ~sqrt(d_model), an initial loss of ~50 and a short run spent undoing it.
            torch.nn.init.normal_(model.shared.weight, std=config.d_model**-0.5)
            steps = pretrain_steps or len(batches)
            _log(
                progress,
                f"pretraining a tiny T5 ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, "
                f"tokenizer: {len(tokenizer)} tokens) for {steps} steps: span corruption + summary prefix LM",
            )
            _pretrain(model, batches, steps, learning_rate, pretrain_seconds_budget, seed, progress)
        finally:
            torch.set_num_threads(threads)

        model.generation_config = GenerationConfig(
            decoder_start_token_id=tokenizer.pad_token_id,
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
        _log(progress, f"built the tiny T5 in {time.monotonic() - t0:.0f}s -> {out}")
    return out


def _pretrain(
    model: Any,
    batches: list[tuple[Any, Any]],
    steps: int,
    lr: float,
    seconds_budget: float | None,
    seed: int,
    progress: bool,
) -> None:
    import torch

    # bf16 autocast is ~1.5x faster on CPUs with native bf16 (weights and optimizer stay fp32).
    bf16 = bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:  # linear warmup, then cosine decay to 10%
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    log_every = max(1, steps // 10)
    losses: list[float] = []
    t0 = time.monotonic()
    model.train()
    for step in range(steps):
        if not order:  # each pass in a new order
            order = torch.randperm(len(batches), generator=gen).tolist()
        input_ids, labels = batches[order.pop()]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=input_ids, attention_mask=input_ids.ne(0), labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        elapsed = time.monotonic() - t0
        if (step + 1) % log_every == 0 or step + 1 == steps:
            _log(progress, f"  step {step + 1}/{steps}  loss {sum(losses) / len(losses):.3f}  {elapsed:.0f}s")
            losses.clear()
        if seconds_budget is not None and elapsed > seconds_budget and step + 1 < steps:
            _log(progress, f"  stopping pretraining at step {step + 1}: past its {seconds_budget:.0f}s budget")
            break
    model.eval()
