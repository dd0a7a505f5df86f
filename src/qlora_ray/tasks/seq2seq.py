"""Seq2seq fine-tuning (T5 and the like): source text in, summary out, ROUGE on generated summaries."""

from __future__ import annotations

import contextlib

import torch
from datasets import DatasetDict
from transformers import (
    AutoModelForSeq2SeqLM,
    DataCollatorForSeq2Seq,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
)

from qlora_ray import eval_generation
from qlora_ray.config import Config, ConfigError, DataSettings
from qlora_ray.data import TokenizedData, encode_splits
from qlora_ray.eval_set import SchedulesEvalSet
from qlora_ray.metrics import seq2seq_rouge

MODEL_CLASS = AutoModelForSeq2SeqLM
PEFT_TASK_TYPE = "SEQ_2_SEQ_LM"


def tokenize(raw: DatasetDict, tokenizer, settings: DataSettings) -> TokenizedData:
    def encode(batch: dict) -> dict:
        inputs = tokenizer(
            [settings.prefix + t for t in batch[settings.text_column]],
            max_length=settings.max_source_length,
            truncation=True,
        )
        labels = tokenizer(text_target=batch[settings.summary_column], max_length=settings.max_target_length,
                           truncation=True)
        return {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
                "labels": labels["input_ids"]}

    return encode_splits(raw, encode)


def build_trainer(model, tokenizer, data: TokenizedData, config: Config, training_args: dict) -> Seq2SeqTrainer:
    """Seq2SeqTrainer that evaluates loss and ROUGE of greedy (or beam) generations."""
    args = Seq2SeqTrainingArguments(
        **training_args,
        predict_with_generate=True,
        generation_max_length=config.data.max_target_length,
        generation_num_beams=config.train.num_beams,
        label_names=["labels"],
    )
    train_ds, eval_ds = data.datasets()
    # auto: on a GPU only, where the captured step pays (on CPU it decodes eagerly, no faster than generate).
    wanted = config.train.eval_generation == "engine" or (config.train.eval_generation == "auto"
                                                           and torch.cuda.is_available())
    engine = wanted and eval_generation.supports(model, config.train.num_beams)
    if config.train.eval_generation == "engine" and not engine:
        raise ConfigError(f"eval_generation engine decodes T5-family models greedily, without generation-config "
                          f"extras ({model.config.model_type}, num_beams {config.train.num_beams})")
    return EvalTrainer(
        engine_generation=engine,
        eval_schedule=config,
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
        processing_class=tokenizer,
        compute_metrics=seq2seq_rouge(tokenizer),
    )


class EvalTrainer(SchedulesEvalSet, Seq2SeqTrainer):
    """Seq2SeqTrainer whose evaluations score the eval set's schedule (eval_set.SchedulesEvalSet), eagerly
    (compiled blocks would recompile for every generation shape) and, with engine_generation, generate
    through `eval_generation.GreedyT5Generator` (the serving engine's decode step) instead of `generate`:
    the same tokens for a fraction of the launches. The loss, the labels and the metrics are the parent's."""

    def __init__(self, *args, engine_generation: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.engine_generation = engine_generation

    def evaluation_loop(self, *args, **kwargs):
        max_length = self.args.generation_max_length or self.model.generation_config.max_length
        engine = self.engine_generation and max_length > 1  # (max_length 1: the start token, nothing to decode)
        dataloader = args[0] if args else kwargs["dataloader"]  # what is evaluated now (evaluate(eval_dataset=))
        generation = self._engine_generate(dataloader.dataset, max_length) if engine else contextlib.nullcontext()
        with torch.compiler.set_stance("force_eager"), generation:
            return super().evaluation_loop(*args, **kwargs)

    @contextlib.contextmanager
    def _engine_generate(self, dataset, max_length: int):
        model = self.model
        sources = dataset["input_ids"]
        rows = max(1, min(self.args.per_device_eval_batch_size, len(sources)))  # (no batch is larger)
        generator = eval_generation.GreedyT5Generator(
            model, max_rows=rows, max_source=max(map(len, sources), default=1), max_new=max_length - 1)

        original = model.generate

        def generate(input_ids=None, attention_mask=None, **kwargs):
            if kwargs.get("num_beams") not in (None, 1) or kwargs.get("max_length") not in (None, max_length):
                return original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)  # not built for it
            return generator.generate(input_ids, attention_mask)  # no autocast, as generate() runs in evaluation

        model.generate = generate  # the parent's prediction_step calls self.model.generate
        try:
            yield
        finally:
            del model.generate
            generator.close()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # back to the training steps (and to other trials on a shared GPU)
