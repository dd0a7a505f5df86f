"""Causal LM fine-tuning (Llama, Phi and the like) through TRL's SFTTrainer.

Each example is a prompt (the configured prefix + the text column) and a completion (the
summary column + EOS). The task tokenizes them itself, so truncation cuts the prompt to
max_source_length and the completion to max_target_length and never the other's tokens;
`completion_mask` makes the loss count completion tokens only. Evaluation reports the loss
and ROUGE of greedy completions of the eval prompts, under the same names as seq2seq.
"""

from __future__ import annotations

import torch
from datasets import DatasetDict
from transformers import AutoModelForCausalLM
from trl import SFTConfig, SFTTrainer

from qlora_ray.config import Config, DataSettings
from qlora_ray.data import TokenizedData, encode_splits
from qlora_ray.metrics import rouge

MODEL_CLASS = AutoModelForCausalLM
PEFT_TASK_TYPE = "CAUSAL_LM"


def prompt_text(settings: DataSettings, text: str) -> str:
    if settings.prompt_template:
        return settings.prompt_template.replace("{text}", text)
    return f"{settings.prefix}{text}\n"


def tokenize(raw: DatasetDict, tokenizer, settings: DataSettings) -> TokenizedData:
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


class _SFTWithRouge(SFTTrainer):
    """SFTTrainer whose evaluation also generates the eval completions and scores them with ROUGE."""

    def __init__(self, *args, eval_rows: dict, max_new_tokens: int, **kwargs):
        super().__init__(*args, **kwargs)
        self._eval_rows, self._max_new_tokens = eval_rows, max_new_tokens

    def evaluation_loop(self, *args, **kwargs):
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", "eval")
        output.metrics.update({f"{prefix}_{k}": v for k, v in self._generation_metrics().items()})
        return output

    @torch.no_grad()
    def _generation_metrics(self) -> dict[str, float]:
        tokenizer, model = self.processing_class, self.model
        prompts, references = [], []
        for ids, mask in zip(self._eval_rows["input_ids"], self._eval_rows["completion_mask"], strict=True):
            start = mask.index(1)
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
    )
