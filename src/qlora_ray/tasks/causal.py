"""Causal LM fine-tuning (Llama, Phi and the like) through TRL's SFTTrainer.

The task tokenizes the data itself, in one of three formats (DataSettings.format, resolved from the
columns by data.load_raw), each into `input_ids` and a `completion_mask` (1: the token counts in the loss):

- prompt-completion: the prompt (`prompt_text`: the prompt template, or the prefix, around the text
  column) and the completion (the summary column + EOS). Truncation cuts the prompt to
  max_source_length and the completion to max_target_length and never the other's tokens; the loss
  counts completion tokens only.
- messages: a conversation rendered with the chat template (data.chat_template, else the tokenizer's)
  and tokenized as a whole, without added special tokens; the loss counts the assistant turns only
  (each from where the rendered conversation before it, with the generation prompt, ends, to where the
  conversation through it ends). The prompt is everything before the last assistant turn: at most
  max_source_length tokens (longer conversations are left out), the last turn cut to max_target_length.
- text: already formatted text (BOS once, EOS added when missing), cut to max_source_length +
  max_target_length tokens; the loss counts every token.

Evaluation reports the loss, and (prompt-completion, messages) the ROUGE of greedy completions of the
eval prompts (the last assistant turn, for messages), under the same names as seq2seq; format text has
no completions to compare, so its ROUGE is NaN and the sweep optimizes eval_loss.

Serving formats requests with `prompt_ids` (a completion prompt) and `chat_prompt_ids` (a chat), given
the registry entry's "task" dict, exactly as training formatted the prompts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from datasets import DatasetDict
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

from qlora_ray.config import MESSAGES, TEXT, Config, ConfigError, DataSettings
from qlora_ray.data import TokenizedData, encode_splits, resolve_format
from qlora_ray.eval_set import SchedulesEvalSet
from qlora_ray.metrics import ROUGE_TYPES, rouge

MODEL_CLASS = AutoModelForCausalLM
PEFT_TASK_TYPE = "CAUSAL_LM"


def _setting(settings: DataSettings | Mapping[str, Any], key: str) -> Any:
    """A DataSettings field, from the settings or from a registry entry's "task" dict (missing keys:
    the defaults, which are what entries recorded before the key existed were trained with)."""
    if isinstance(settings, Mapping):
        return settings.get(key, getattr(DataSettings, key, None))
    return getattr(settings, key)


def data_format(settings: DataSettings | Mapping[str, Any]) -> str:
    """prompt-completion, messages or text ("auto", from entries before formats, was prompt-completion)."""
    fmt = _setting(settings, "format")
    return fmt if fmt in (MESSAGES, TEXT) else "prompt-completion"


def prompt_text(settings: DataSettings | Mapping[str, Any], text: str, tokenizer=None) -> str:
    """The prompt a completion request's `text` becomes, as training formatted prompts. prompt-completion:
    the prompt template with {text} replaced, else prefix + text + newline. text: the prompt template
    around it if there is one (the rows were formatted with it), else the text as is. messages: `text` as
    one user turn, rendered with the chat template and the generation prompt (needs the tokenizer;
    tokenize the result without special tokens: prompt_ids does it all)."""
    template = _setting(settings, "prompt_template")
    fmt = data_format(settings)
    if fmt == MESSAGES:
        if tokenizer is None:
            raise ValueError("a messages-format prompt is rendered with the chat template: pass the tokenizer")
        return render_chat(settings, tokenizer, [{"role": "user", "content": text}], add_generation_prompt=True)
    if template:
        return template.replace("{text}", text)
    return text if fmt == TEXT else f"{_setting(settings, 'prefix')}{text}\n"


def prompt_ids(settings: DataSettings | Mapping[str, Any], tokenizer, text: str) -> list[int]:
    """Token ids of a completion request's prompt, exactly as training tokenized its prompts:
    prompt-completion and text: prompt_text with the tokenizer's special tokens (BOS), at most
    max_source_length tokens (the end cut, as in training); messages: chat_prompt_ids of one user turn."""
    if data_format(settings) == MESSAGES:
        return chat_prompt_ids(settings, tokenizer, [{"role": "user", "content": text}])
    ids = tokenizer(prompt_text(settings, text))["input_ids"]
    return _one_bos(ids, tokenizer)[: int(_setting(settings, "max_source_length"))]


def chat_prompt_ids(settings: DataSettings | Mapping[str, Any], tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a chat request, ending where the assistant's answer starts. messages format: the
    conversation through the chat template (the recorded data.chat_template, else the tokenizer's) with
    the generation prompt, tokenized without added special tokens (the template has them), as training
    rendered the prompt of each assistant turn (not cut: the caller refuses one over max_source_length).
    prompt-completion and text: the adapter was trained on single prompts, so the chat must be one user
    turn, which becomes prompt_ids of its content. ValueError when it cannot be formatted."""
    if data_format(settings) == MESSAGES:
        text = render_chat(settings, tokenizer, messages, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(messages) != 1 or messages[0].get("role") != "user":
        raise ValueError(f"this adapter was trained on single prompts ({data_format(settings)} data), not "
                         "conversations: send one user message (or use the completions API)")
    return prompt_ids(settings, tokenizer, messages[0]["content"])


def chat_template(settings: DataSettings | Mapping[str, Any], tokenizer) -> str:
    """data.chat_template, else the tokenizer's; ConfigError when there is neither."""
    template = _setting(settings, "chat_template") or getattr(tokenizer, "chat_template", None)
    if not template:
        raise ConfigError(f"{getattr(tokenizer, 'name_or_path', 'the tokenizer') or 'the tokenizer'} has no chat "
                          "template, which the messages format renders conversations with: set data.chat_template "
                          "(a Jinja template) in the config, or use a model whose tokenizer has one")
    return template


def render_chat(settings: DataSettings | Mapping[str, Any], tokenizer, messages: list[dict], *,
                add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=chat_template(settings, tokenizer), tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _one_bos(ids: list[int], tokenizer) -> list[int]:
    """Text that starts with the BOS token's text (e.g. "<s>[INST] ...") gets no second BOS."""
    bos = tokenizer.bos_token_id
    return ids[1:] if bos is not None and len(ids) > 1 and ids[0] == ids[1] == bos else ids


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def tokenize(raw: DatasetDict, tokenizer, settings: DataSettings) -> TokenizedData:
    fmt = resolve_format(raw["train"], settings)
    if fmt == MESSAGES:
        return _tokenize_messages(raw, tokenizer, settings)
    if fmt == TEXT:
        return _tokenize_text(raw, tokenizer, settings)
    eos = tokenizer.eos_token_id

    def encode(batch: dict) -> dict:
        prompts = tokenizer([prompt_text(settings, t) for t in batch[settings.text_column]],
                            max_length=settings.max_source_length, truncation=True)["input_ids"]
        completions = tokenizer(batch[settings.summary_column], max_length=settings.max_target_length - 1,
                                truncation=True, add_special_tokens=False)["input_ids"]
        return {
            "input_ids": [p + c + [eos] for p, c in zip(prompts, completions, strict=True)],
            "completion_mask": [[0] * len(p) + [1] * (len(c) + 1) for p, c in zip(prompts, completions, strict=True)],
        }

    return encode_splits(raw, encode)


def _tokenize_text(raw: DatasetDict, tokenizer, settings: DataSettings) -> TokenizedData:
    eos, limit = tokenizer.eos_token_id, settings.max_source_length + settings.max_target_length

    def encode(batch: dict) -> dict:
        rows = []
        for ids in tokenizer(batch[settings.text_column])["input_ids"]:
            ids = _one_bos(ids, tokenizer)
            if eos is not None and ids[-1:] != [eos]:
                ids = ids + [eos]  # the model learns where a text ends (TRL appends EOS to texts too)
            rows.append(ids[:limit])
        return {"input_ids": rows, "completion_mask": [[1] * len(ids) for ids in rows]}

    return encode_splits(raw, encode)


def _tokenize_messages(raw: DatasetDict, tokenizer, settings: DataSettings) -> TokenizedData:
    chat_template(settings, tokenizer)  # none: the ConfigError now, before any row
    column, max_source, max_target = settings.messages_column, settings.max_source_length, settings.max_target_length
    too_long = {"n": 0, "longest": 0}

    def render_ids(messages: list[dict], generation_prompt: bool) -> list[int]:
        try:
            text = render_chat(settings, tokenizer, messages, add_generation_prompt=generation_prompt)
        except ConfigError:
            raise
        except Exception as e:  # the template's own checks (role order, ...) raise their own errors
            raise ConfigError(f"{settings.dataset}: a conversation does not fit the chat template "
                              f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_one(messages: list[dict]) -> tuple[list[int], list[int]] | None:
        full = render_ids(messages, False)
        mask = [0] * len(full)
        prompt_len = 0
        for i, turn in enumerate(messages):
            if turn["role"] != "assistant":
                continue
            start = _common_prefix(render_ids(messages[:i], True), full)
            end = _common_prefix(render_ids(messages[: i + 1], False), full) if i + 1 < len(messages) else len(full)
            mask[start:end] = [1] * (end - start)
            prompt_len = start
        if prompt_len > max_source:
            too_long["n"] += 1
            too_long["longest"] = max(too_long["longest"], prompt_len)
            return None
        if prompt_len >= len(full) or 1 not in mask[prompt_len:]:
            raise ConfigError(f"{settings.dataset}: the chat template renders nothing for a conversation's last "
                              "assistant turn (does it drop assistant turns?)")
        end = prompt_len + max_target
        return full[:end], mask[:end]

    def encode(batch: dict) -> dict:
        out: dict[str, list] = {"input_ids": [], "completion_mask": []}
        for messages in batch[column]:
            encoded = encode_one(messages)
            if encoded is not None:
                out["input_ids"].append(encoded[0])
                out["completion_mask"].append(encoded[1])
        return out

    data = encode_splits(raw, encode)
    for split in ("train", "eval"):
        if not getattr(data, split).get("input_ids"):
            raise ConfigError(f"{settings.dataset}: no {split} conversation fits --max-source-length {max_source} "
                              f"before its last assistant turn (the longest is {too_long['longest']} tokens)")
    if too_long["n"]:
        print(f"{settings.dataset}: left out {too_long['n']} conversations longer than --max-source-length "
              f"{max_source} before their last assistant turn (the longest: {too_long['longest']} tokens)")
    return data


def _last_completion_start(mask: list[int]) -> int:
    """Where the last run of completion tokens starts: the prompt of the last assistant turn ends there."""
    end = len(mask) - mask[::-1].index(1)
    start = end
    while start > 0 and mask[start - 1] == 1:
        start -= 1
    return start


class _SFTWithRouge(SchedulesEvalSet, SFTTrainer):
    """SFTTrainer whose evaluation also generates the eval completions and scores them with ROUGE, on the
    eval set's schedule (eval_set.SchedulesEvalSet)."""

    def __init__(self, *args, eval_rows: dict, max_new_tokens: int, generate: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self._eval_rows, self._max_new_tokens, self._generate = eval_rows, max_new_tokens, generate

    def evaluation_loop(self, *args, **kwargs):
        # Eagerly: eval batches and generation's growing cache would recompile compiled blocks for each shape.
        with torch.compiler.set_stance("force_eager"):
            output = super().evaluation_loop(*args, **kwargs)
            prefix = kwargs.get("metric_key_prefix", "eval")
            output.metrics.update({f"{prefix}_{k}": v for k, v in self._generation_metrics().items()})
        return output

    @torch.no_grad()
    def _generation_metrics(self) -> dict[str, float]:
        if not self._generate:  # format text: no completion to compare with
            return {key: math.nan for key in ROUGE_TYPES}
        tokenizer, model = self.processing_class, self.model
        prompts, references = [], []
        rows = len(self._eval_rows["input_ids"])
        if self.eval_examples is not None:  # the same share of the rows as of the (maybe packed) loss dataset
            rows = min(rows, math.ceil(rows * self.eval_examples[0] / len(self.eval_dataset)))
        for ids, mask in zip(self._eval_rows["input_ids"][:rows], self._eval_rows["completion_mask"][:rows],
                             strict=True):
            start = _last_completion_start(mask)
            prompts.append(ids[:start])
            references.append(tokenizer.decode(ids[start:], skip_special_tokens=True).strip())
        predictions = []
        was_training, model_device = model.training, next(model.parameters()).device
        model.eval()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        for i in range(0, len(prompts), self.args.per_device_eval_batch_size):
            chunk = prompts[i : i + self.args.per_device_eval_batch_size]
            width = max(map(len, chunk))  # left padding: every prompt ends where generation starts
            input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=model_device)
            attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=model_device)
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                 max_new_tokens=self._max_new_tokens, pad_token_id=pad)
            predictions += [t.strip() for t in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]
        model.train(was_training)
        return rouge(predictions, references)


def build_trainer(model, tokenizer, data: TokenizedData, config: Config, training_args: dict) -> SFTTrainer:
    args = SFTConfig(
        **training_args,
        max_length=config.data.max_source_length + config.data.max_target_length,
        packing=config.train.packing,
        completion_only_loss=True,
        dataset_kwargs={"skip_prepare_dataset": False},
    )
    train_ds, eval_ds = data.datasets()
    return _SFTWithRouge(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        eval_rows=data.eval,
        max_new_tokens=config.data.max_target_length,
        generate=data_format(config.data) != TEXT,
        eval_schedule=config,
    )
