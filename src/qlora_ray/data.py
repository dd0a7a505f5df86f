"""Training data: load (embedded corpus, local file or hub), split, validate. Tasks tokenize it.

Rows read one of three ways (DataSettings.format; "auto" is resolved here, from the columns):

- prompt-completion: a text (prompt) column and a summary (completion) column, both strings;
- messages: a column of chat turns, each a list of {"role", "content"} ending in an assistant turn;
- text: one column of already formatted text (causal LMs only; the loss counts all of it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset, DatasetDict, Value, load_dataset

from qlora_ray.config import (
    EMBEDDED_DATASET,
    FILE_FORMATS,
    MESSAGES,
    PROMPT_COMPLETION,
    TEXT,
    ConfigError,
    DataSettings,
)

CHAT_ROLES = ("system", "user", "assistant", "tool")


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
    """A DatasetDict with "train" and "eval" splits holding the configured format's columns, checked.

    `settings.format` "auto" is replaced, in place, by the format the columns hold (see resolve_format),
    so everything after (tokenization, the sweep record, the registry entry) sees the real one."""
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
    settings.format = resolve_format(splits["train"], settings)
    for split in ("train", "eval"):
        _check_columns(splits[split], settings)
    raw = DatasetDict(
        train=_clean(splits["train"], settings, settings.train_size, progress),
        eval=_clean(splits["eval"], settings, settings.eval_size, progress),
    )
    if settings.format == TEXT and settings.prompt_template and not _formatted_with(raw["train"], settings):
        # Text rows are formatted already: the template only tells serving how they were. One they do not
        # follow (e.g. a preset's, for other data) would make served prompts unlike any training row.
        if progress:
            print(f"data.prompt_template {settings.prompt_template!r} is not how the text rows read: not "
                  "recorded for serving (completion prompts will be served as sent)")
        settings.prompt_template = None
    return raw


def _formatted_with(rows: Dataset, settings: DataSettings, sample: int = 200) -> bool:
    """Whether most text rows contain the prompt template's fixed parts (what comes before and after {text})."""
    parts = [part.strip() for part in settings.prompt_template.split("{text}") if part.strip()]
    texts = rows[settings.text_column][:sample]
    return not texts or all(sum(part in t for t in texts) * 2 >= len(texts) for part in parts)


def resolve_format(rows: Dataset, settings: DataSettings) -> str:
    """The configured format, or for "auto": prompt-completion when the text and summary columns are both
    there, else messages when the messages column is, else text when the text column is the only column
    of strings; else prompt-completion (whose column check then says what is missing)."""
    if settings.format != "auto":
        return settings.format
    columns = rows.column_names
    if settings.text_column in columns and settings.summary_column in columns:
        return PROMPT_COMPLETION
    if settings.messages_column in columns:
        return MESSAGES
    strings = [c for c in columns if _is_string(rows.features.get(c))]
    if strings == [settings.text_column]:
        return TEXT
    return PROMPT_COMPLETION


def columns_of(settings: DataSettings) -> list[tuple[str, str]]:
    """(flag, column) for each column the settings' (resolved) format reads."""
    if settings.format == MESSAGES:
        return [("--messages-column", settings.messages_column)]
    if settings.format == TEXT:
        return [("--text-column", settings.text_column)]
    return [("--text-column", settings.text_column), ("--summary-column", settings.summary_column)]


def _is_string(feature) -> bool:
    return isinstance(feature, Value) and feature.dtype in ("string", "large_string")


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
    for flag, column in columns_of(settings):
        if column not in rows.column_names:
            raise ConfigError(
                f"column {column!r} ({flag}) not in {settings.dataset}; columns: {', '.join(rows.column_names)}"
            )
        feature = rows.features.get(column)
        if settings.format == MESSAGES:
            if not _is_turn_list(feature):
                raise ConfigError(f"column {column!r} ({flag}) of {settings.dataset} holds {feature}, not chat turns: "
                                  'each row must be a list of {"role": ..., "content": ...}')
        elif feature is not None and not _is_string(feature):
            raise ConfigError(f"column {column!r} ({flag}) of {settings.dataset} holds {feature}, not text")


def _is_turn_list(feature) -> bool:
    """A list column (of {role, content} structs, or of JSON objects when rows differ in keys); check_messages
    checks each conversation."""
    from datasets import LargeList, List

    return isinstance(feature, (List, LargeList))


def check_messages(messages: object, where: str) -> str | None:
    """None for a usable conversation, "empty" for one to leave out (no turns, or an empty last answer);
    ConfigError, saying what and `where`, for a malformed one."""
    if messages is None or (isinstance(messages, list) and not messages):
        return "empty"
    if not isinstance(messages, list):
        raise ConfigError(f"{where}: expected a list of chat turns, got {type(messages).__name__}")
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or \
                not isinstance(turn.get("content"), str):
            raise ConfigError(f"{where}, turn {i}: expected {{'role': str, 'content': str}}, got {turn!r:.200}")
        if turn["role"] not in CHAT_ROLES:
            raise ConfigError(f"{where}, turn {i}: unknown role {turn['role']!r}; roles: {', '.join(CHAT_ROLES)}")
    if messages[-1]["role"] != "assistant":
        raise ConfigError(f"{where}: the last turn must be the assistant's (the completion trained on and scored), "
                          f"got {messages[-1]['role']!r}")
    if not messages[-1]["content"].strip():
        return "empty"
    return None


def _clean(rows: Dataset, settings: DataSettings, limit: int | None, progress: bool = False) -> Dataset:
    columns = [column for _, column in columns_of(settings)]
    rows = rows.select_columns(columns)
    before = len(rows)
    if settings.format == MESSAGES:
        column = settings.messages_column
        for i, cell in enumerate(rows[column]):  # malformed turns are errors; empty conversations are left out
            check_messages(cell, f"{settings.dataset}: row {i} of {column!r}")
        rows = rows.filter(lambda r: check_messages(r[column], "") is None)
    else:
        rows = rows.filter(lambda r: all(isinstance(r[c], str) and r[c].strip() for c in columns))
    if len(rows) == 0:
        raise ConfigError(f"{settings.dataset}: no rows with non-empty {' and '.join(map(repr, columns))}")
    if progress and len(rows) < before:
        print(f"{settings.dataset}: left out {before - len(rows)} of {before} rows with an empty "
              f"{' or '.join(map(repr, columns))}")
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
