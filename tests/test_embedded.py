"""The offline corpus and tiny T5 builders: determinism, splits, tokenizer, 4-bit load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qlora_ray import embedded

MAX_PAIRS = 400


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def corpus(cache: Path) -> Path:
    return embedded.build_corpus(cache, max_pairs=MAX_PAIRS, progress=False)


@pytest.fixture(scope="module")
def model_dir(cache: Path, corpus: Path) -> Path:
    # A few pretraining steps: this checks the plumbing, not the model's quality.
    return embedded.build_tiny_t5(cache, corpus=corpus, pretrain_steps=4, progress=False)


def test_corpus_is_deterministic_and_cached(corpus: Path, tmp_path: Path) -> None:
    again = embedded.build_corpus(tmp_path, max_pairs=MAX_PAIRS, progress=False)
    assert again != corpus
    assert again.read_bytes() == corpus.read_bytes()
    mtime = again.stat().st_mtime_ns
    assert embedded.build_corpus(tmp_path, max_pairs=MAX_PAIRS, progress=False) == again
    assert again.stat().st_mtime_ns == mtime  # reused, not rebuilt


def test_corpus_records(corpus: Path) -> None:
    records = [json.loads(line) for line in corpus.read_text().splitlines()]
    assert len(records) == MAX_PAIRS
    assert len({r["text"] for r in records}) == len(records)
    for r in records:
        assert {"text", "summary", "name", "module", "split"} <= r.keys()
        assert r["name"].startswith(r["module"] + ".")
        assert 3 <= len(r["summary"].split()) <= 30 and r["summary"].endswith(".")
        assert len(r["text"]) <= embedded.MAX_TEXT_CHARS
        assert r["text"].startswith(("def ", "async def ", "class "))
        assert not r["text"].splitlines()[1].lstrip().startswith(('"""', "'''", 'r"""'))


def test_splits_are_disjoint_by_module(corpus: Path) -> None:
    records = embedded.load_corpus(corpus)
    train = {r["module"] for r in records if r["split"] == "train"}
    held_out = {r["module"] for r in records if r["split"] == "eval"}
    assert train and held_out
    assert not train & held_out
    assert 0.02 < len(embedded.load_corpus(corpus, "eval")) / len(records) < 0.3


def test_tokenizer_round_trips_and_appends_eos(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    source = "summarize: def f(x):\n    return {'a': x ** 2}  # über\n"
    ids = tok(source).input_ids
    assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == source
    sentinel = tok.convert_tokens_to_ids("<extra_id_0>")
    assert sentinel == len(tok) - 1 and tok("<extra_id_0>").input_ids == [sentinel, tok.eos_token_id]

    tok.save_pretrained(model_dir.parent / "tok-copy")
    again = AutoTokenizer.from_pretrained(model_dir.parent / "tok-copy")
    assert again(source).input_ids == ids


def test_model_loads_in_4bit_and_generates(model_dir: Path) -> None:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, BitsAndBytesConfig

    tok = AutoTokenizer.from_pretrained(model_dir)
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForSeq2SeqLM.from_pretrained(model_dir, quantization_config=quant, device_map="cpu")
    assert model.config.decoder_start_token_id == tok.pad_token_id
    assert type(model.encoder.block[0].layer[0].SelfAttention.q).__name__ == "Linear4bit"
    batch = tok(["summarize: def f():\n    return 1", "summarize: x = 1"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    assert out.shape[0] == 2 and 1 < out.shape[1] <= 9
    assert isinstance(tok.batch_decode(out, skip_special_tokens=True)[0], str)


def test_model_is_cached(cache: Path, model_dir: Path) -> None:
    assert embedded.build_tiny_t5(cache, progress=False) == model_dir
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "config.json").is_file()


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("QLORA_RAY_CACHE", str(tmp_path))
    assert embedded.default_cache_dir() == tmp_path
    monkeypatch.delenv("QLORA_RAY_CACHE")
    assert embedded.default_cache_dir() == Path.home() / ".cache" / "qlora-ray"
