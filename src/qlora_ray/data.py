"""Summarization data: load (embedded corpus, local file or hub), split, validate. Tasks tokenize it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset

from qlora_ray.config import EMBEDDED_DATASET, FILE_FORMATS, ConfigError, DataSettings


@dataclass
class TokenizedData:
    """Plain columns, so the data travels through Ray's object store to any node."""

    train: dict[str, list]
    eval: dict[str, list]

    def datasets(self) -> tuple[Dataset, Dataset]:
        return Dataset.from_dict(self.train), Dataset.from_dict(self.eval)


def is_local_file(dataset: str) -> bool:
    return Path(dataset).suffix.lower() in FILE_FORMATS


def load_raw(settings: DataSettings, *, progress: bool = True) -> DatasetDict:
    """A DatasetDict with "train" and "eval" splits holding at least the two configured columns."""
    name = settings.dataset
    if name == EMBEDDED_DATASET:
        from qlora_ray import embedded

        corpus = embedded.build_corpus(embedded.default_cache_dir(), progress=progress)
        rows = load_dataset("json", data_files=str(corpus), split="train")
        splits = DatasetDict(
            train=rows.filter(lambda r: r["split"] == "train"),
            eval=rows.filter(lambda r: r["split"] == "eval"),
        )
    elif name.startswith("embedded:"):
        raise ConfigError(f"unknown embedded dataset {name!r}; the one built in is {EMBEDDED_DATASET!r}")
    elif is_local_file(name):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError(f"data file not found: {path}")
        try:
            rows = load_dataset(FILE_FORMATS[path.suffix.lower()], data_files=str(path), split="train")
        except Exception as e:  # datasets raises many types for malformed files
            raise ConfigError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
        splits = DatasetDict(train=rows)
    else:
        try:
            splits = load_dataset(name)
        except Exception as e:
            raise ConfigError(f"cannot load dataset {name!r} from the hub: {str(e).splitlines()[0]}") from None
    splits = _train_eval(splits, settings)
    _check_columns(splits["train"], settings)
    return DatasetDict(
        train=_clean(splits["train"], settings, settings.train_size),
        eval=_clean(splits["eval"], settings, settings.eval_size),
    )


def _train_eval(splits: DatasetDict, settings: DataSettings) -> DatasetDict:
    if "train" not in splits:
        raise ConfigError(f"dataset {settings.dataset!r} has no 'train' split (has {list(splits)})")
    for held_out in ("eval", "validation", "test"):
        if held_out in splits:
            return DatasetDict(train=splits["train"], eval=splits[held_out])
    # One file or split only: hold out a deterministic slice of it.
    n = len(splits["train"])
    eval_n = min(settings.eval_size, max(1, n // 5))
    if n - eval_n < 1:
        raise ConfigError(f"dataset {settings.dataset!r} has {n} rows: too few to hold out an eval split")
    parts = splits["train"].train_test_split(test_size=eval_n, seed=settings.seed)
    return DatasetDict(train=parts["train"], eval=parts["test"])


def _check_columns(rows: Dataset, settings: DataSettings) -> None:
    for flag, column in (("--text-column", settings.text_column), ("--summary-column", settings.summary_column)):
        if column not in rows.column_names:
            raise ConfigError(
                f"column {column!r} ({flag}) not in {settings.dataset}; columns: {', '.join(rows.column_names)}"
            )


def _clean(rows: Dataset, settings: DataSettings, limit: int | None) -> Dataset:
    text, summary = settings.text_column, settings.summary_column
    rows = rows.select_columns([text, summary])
    rows = rows.filter(lambda r: isinstance(r[text], str) and isinstance(r[summary], str) and r[text].strip()
                       and r[summary].strip())
    if len(rows) == 0:
        raise ConfigError(f"{settings.dataset}: no rows with non-empty {text!r} and {summary!r}")
    if limit is not None and len(rows) > limit:
        rows = rows.shuffle(seed=settings.seed).select(range(limit))
    return rows


def encode_splits(raw: DatasetDict, encode) -> TokenizedData:
    """Both splits through a task's batched `encode`, as plain columns."""
    columns = {}
    for split in ("train", "eval"):
        encoded = raw[split].map(encode, batched=True, remove_columns=raw[split].column_names,
                                 desc=f"tokenizing {split}")
        columns[split] = encoded.to_dict()
    return TokenizedData(train=columns["train"], eval=columns["eval"])
