"""Seq2seq fine-tuning (T5 and the like): source text in, summary out, ROUGE on generated summaries."""

from __future__ import annotations

from datasets import DatasetDict
from transformers import (
    AutoModelForSeq2SeqLM,
    DataCollatorForSeq2Seq,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
)

from qlora_ray.config import Config, DataSettings
from qlora_ray.data import TokenizedData, encode_splits
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
    return Seq2SeqTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
        processing_class=tokenizer,
        compute_metrics=seq2seq_rouge(tokenizer),
    )
