"""Bring-your-own data for causal sweeps: prompt-completion, messages and text rows, end to end on a tiny
Llama (tokenization and its completion mask, the prompts serving rebuilds from the registry's record,
training and evaluation through the trial's own builders), the Llama-2-7B SFT preset's settings as the
trainer receives them, and the errors that stop a bad sweep before Ray starts."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from qlora_ray import cli, registry, trial
from qlora_ray.config import ConfigError, DataSettings, load_config
from qlora_ray.data import load_raw
from qlora_ray.tasks import causal
from tests.conftest import run_cli

TASK_DICT_KEYS = ("prefix", "max_source_length", "max_target_length", "prompt_template", "format", "chat_template")
# The tokenizer's own template (embedded_causal.CHAT_TEMPLATE) has BOS and role tokens; this one, set in
# data.chat_template, renders differently, so a test can tell which one was used.
OTHER_TEMPLATE = (
    "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}### assistant: {% endif %}"
)


@pytest.fixture(scope="module")
def llama_dir(cache_dir) -> Path:
    """A causal tokenizer trained on part of the embedded corpus (BOS, role tokens, a chat template) and a
    random-weight two-layer Llama over it: built once into the test cache, in seconds."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_ray import embedded, embedded_causal

    out = Path(cache_dir) / "test-causal-data-llama-v1"
    if (out / "config.json").is_file():
        return out
    rows = embedded.load_corpus(embedded.build_corpus(cache_dir, progress=False), "train")[:600]
    tokenizer = embedded_causal.train_causal_tokenizer([r["text"] for r in rows] + [r["summary"] for r in rows],
                                                       vocab_size=1024)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=math.ceil(len(tokenizer) / 64) * 64, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir))
    LlamaForCausalLM(config).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


@pytest.fixture(scope="module")
def tokenizer(llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama_dir)


@pytest.fixture(scope="module")
def files(cache_dir, tmp_path_factory) -> dict[str, Path]:
    """One JSONL file per format, cut from the embedded corpus, with columns named as users name them."""
    from qlora_ray import embedded

    rows = embedded.load_corpus(embedded.build_corpus(cache_dir, progress=False), "train")[:48]
    folder = tmp_path_factory.mktemp("causal-data")

    def write(name: str, records: list[dict]) -> Path:
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return path

    def conversation(r: dict) -> list[dict]:
        return [{"role": "system", "content": "Answer in one sentence."},
                {"role": "user", "content": r["text"][:120]}, {"role": "assistant", "content": "A definition."},
                {"role": "user", "content": "What does it do?"}, {"role": "assistant", "content": r["summary"]}]

    return {
        "pairs": write("pairs", [{"question": r["text"][:200], "answer": r["summary"]} for r in rows]),
        "messages": write("messages", [{"conversation": conversation(r), "n": i} for i, r in enumerate(rows)]),
        # formatted rows as in guanaco-llama2-1k: BOS text first; some end with EOS, some not
        "text": write("text", [{"text": f"<s>[INST] {r['text'][:120]} [/INST] {r['summary']}"
                                + (" </s>" if i % 2 else ""), "id": i} for i, r in enumerate(rows)]),
    }


def _settings(dataset: Path, **kw) -> DataSettings:
    return DataSettings(dataset=str(dataset), eval_size=6, max_source_length=96, max_target_length=24, **kw)


def _task(settings: DataSettings) -> dict:
    """The entry's "task" as the registry records it and serving reads it back."""
    entry = {"task": registry.task_settings(settings, num_beams=1, base_model=None)}
    return registry.entry_task({}, entry)


def _masked(tokenizer, ids: list[int], mask: list[int], keep: int) -> str:
    return tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m == keep])


def test_flags_name_the_columns_and_the_format():
    args = cli.parser("tune_causal.py").parse_args([
        "--prompt-column", "question", "--completion-column", "answer", "--data-format", "messages",
        "--messages-column", "conversation"])
    data = load_config(overrides=cli.overrides_from(args)).data
    assert (data.text_column, data.summary_column, data.format, data.messages_column) == (
        "question", "answer", "messages", "conversation")
    args = cli.parser().parse_args(["--text-column", "body", "--summary-column", "tldr"])  # seq2seq's names stay
    assert load_config(overrides=cli.overrides_from(args)).data.text_column == "body"
    assert set(TASK_DICT_KEYS) <= set(registry.TASK_KEYS)


def test_prompt_completion_rows(tokenizer, files):
    settings = _settings(files["pairs"], text_column="question", summary_column="answer",
                         prompt_template="Explain:\n{text}\nAnswer:")
    raw = load_raw(settings, progress=False)
    assert settings.format == "prompt-completion"  # auto, resolved in place from the columns
    data = causal.tokenize(raw, tokenizer, settings)
    row = raw["train"][0]
    ids, mask = data.train["input_ids"][0], data.train["completion_mask"][0]
    start = mask.index(1)
    assert mask == [0] * start + [1] * (len(ids) - start) and ids[-1] == tokenizer.eos_token_id
    assert _masked(tokenizer, ids, mask, 1) == tokenizer.decode(tokenizer(row["answer"], add_special_tokens=False)
                                                                ["input_ids"][:23] + [tokenizer.eos_token_id])
    # serving's prompt for the raw text, from the recorded task dict, is the training prompt token for token
    task = _task(settings)
    assert task["format"] == "prompt-completion" and task["prompt_template"] == settings.prompt_template
    assert causal.prompt_ids(task, tokenizer, row["question"]) == ids[:start]
    assert causal.prompt_text(task, "x") == "Explain:\nx\nAnswer:"
    assert causal.chat_prompt_ids(task, tokenizer, [{"role": "user", "content": row["question"]}]) == ids[:start]
    with pytest.raises(ValueError, match="one user message"):
        causal.chat_prompt_ids(task, tokenizer, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    # an entry recorded before formats existed (no "format", no "prompt_template") reads as prefix + text
    assert causal.prompt_text({"prefix": "summarize: "}, "x") == "summarize: x\n"


def test_messages_rows_train_on_the_assistant_turns(tokenizer, files):
    settings = dataclasses.replace(_settings(files["messages"], messages_column="conversation"), max_source_length=192)
    raw = load_raw(settings, progress=False)
    assert settings.format == "messages"
    data = causal.tokenize(raw, tokenizer, settings)
    conversation = raw["train"][0]["conversation"]
    ids, mask = data.train["input_ids"][0], data.train["completion_mask"][0]
    text = tokenizer.apply_chat_template(conversation, tokenize=False)
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"][: len(ids)]
    # the loss: both assistant turns (their end-of-turn EOS included), nothing of the system or user turns
    trained = _masked(tokenizer, ids, mask, 1)
    assert trained.startswith("A definition.</s>") and trained.endswith("</s>")
    assert conversation[-1]["content"].split()[0] in trained and "What does it do" not in trained
    assert "What does it do" in _masked(tokenizer, ids, mask, 0)
    # the prompt of the last turn is what serving renders for the conversation before it
    start = causal._last_completion_start(mask)
    assert tokenizer.decode(ids[:start]).endswith("What does it do?\n<|assistant|>\n")
    assert causal.chat_prompt_ids(_task(settings), tokenizer, conversation[:-1]) == ids[:start]
    # a completion request becomes one user turn of the same template
    assert tokenizer.decode(causal.prompt_ids(_task(settings), tokenizer, "hi")) == "<s><|user|>\nhi\n<|assistant|>\n"
    # data.chat_template replaces the tokenizer's, in training and (recorded) in serving
    other = dataclasses.replace(settings, chat_template=OTHER_TEMPLATE)
    ids2 = causal.tokenize(raw, tokenizer, other).train["input_ids"][0]
    assert tokenizer.decode(ids2).startswith("### system: Answer in one sentence.")
    assert tokenizer.decode(causal.chat_prompt_ids(_task(other), tokenizer, conversation[:1])).endswith(
        "### assistant: ")


def test_text_rows_train_on_everything(tokenizer, files):
    settings = _settings(files["text"], prompt_template="[INST] {text} [/INST]")
    raw = load_raw(settings, progress=False)
    assert settings.format == "text"  # the only column of strings (the "id" column is ints)
    data = causal.tokenize(raw, tokenizer, settings)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for ids, mask in zip(data.train["input_ids"], data.train["completion_mask"], strict=True):
        assert mask == [1] * len(ids) and len(ids) <= 96 + 24
        assert ids[0] == bos and ids[1] != bos  # "<s>" in the text is the BOS: not a second one
        assert ids[-1] == eos or len(ids) == 96 + 24  # EOS added where missing, unless cut
    # serving wraps a completion prompt in the template the rows were formatted with
    assert tokenizer.decode(causal.prompt_ids(_task(settings), tokenizer, "Why?")) == "<s>[INST] Why? [/INST]"
    assert causal.prompt_text(_task(dataclasses.replace(settings, prompt_template=None)), "as is") == "as is"
    # a template the rows do not follow (a preset's, say) is not recorded for serving
    other = _settings(files["text"], prompt_template="Summarize:\n{text}\nSummary:")
    load_raw(other, progress=False)
    assert other.prompt_template is None and settings.prompt_template == "[INST] {text} [/INST]"


def _trained(llama_dir, tokenizer, config, data, steps: int) -> dict:
    hparams = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "learning_rate": 3e-3}
    model = trial.build_model(str(llama_dir), config, hparams)
    with tempfile.TemporaryDirectory() as work_dir:
        trainer = trial.build_trainer(model, tokenizer, data, config, work_dir, 3e-3, max_steps=steps)
        if steps:
            trainer.train()
        return trainer.evaluate()


def _config(llama_dir, dataset: Path, preset: str = "tiny-llama-stdlib", **data):
    return load_config(preset, overrides={
        "model": {"name": str(llama_dir), "task": "causal", "compute_dtype": "float32"},
        "data": {"dataset": str(dataset), "format": "auto", "eval_size": 4, "max_source_length": 96,
                 "max_target_length": 8, "prompt_template": None, **data},
        "train": {"max_steps": 2, "eval_every": 2, "batch_size": 4, "gradient_accumulation_steps": 1,
                  "eval_batch_size": 4, "optim": "adamw_torch", "gradient_checkpointing": "none"},
        "search": {"metric": "eval_loss", "mode": "min"}, "output_dir": "/nonexistent"})


def test_text_rows_pack_and_train_through_the_trial(llama_dir, tokenizer, files, one_thread):
    config = _config(llama_dir, files["text"])
    config.train.packing = True
    raw = load_raw(config.data, progress=False)
    data = causal.tokenize(raw, tokenizer, config.data)
    metrics = _trained(llama_dir, tokenizer, config, data, steps=2)
    assert math.isfinite(metrics["eval_loss"]) and metrics["eval_loss"] > 0
    assert all(math.isnan(metrics[f"eval_{k}"]) for k in ("rouge1", "rouge2", "rougeL"))  # nothing to compare
    assert trial._tune_metrics(metrics)["eval_loss"] == metrics["eval_loss"]


def test_messages_rows_evaluate_rouge_on_the_last_turn(llama_dir, tokenizer, files, one_thread):
    config = _config(llama_dir, files["messages"], messages_column="conversation", max_source_length=192)
    raw = load_raw(config.data, progress=False)
    data = causal.tokenize(raw, tokenizer, config.data)
    metrics = _trained(llama_dir, tokenizer, config, data, steps=0)
    assert math.isfinite(metrics["eval_loss"]) and 0 <= metrics["eval_rougeL"] <= 1


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_llama2_sft_preset_reaches_the_trainer(llama_dir, tokenizer, files):
    """The recipe's settings as SFTConfig / the 4-bit base / the adapter receive them (the tiny Llama stands
    in for Llama-2-7B, a local text file for guanaco-llama2-1k)."""
    from transformers import AutoTokenizer

    preset = load_config("llama2-7b-sft")
    assert (preset.model.name, preset.data.dataset, preset.data.format) == (
        "meta-llama/Llama-2-7b-hf", "mlabonne/guanaco-llama2-1k", "text")
    assert (preset.search.metric, preset.search.mode) == ("eval_loss", "min")
    assert preset.data.max_source_length + preset.data.max_target_length == 512
    config = dataclasses.replace(preset, model=dataclasses.replace(preset.model, name=str(llama_dir), task="causal"),
                                 data=dataclasses.replace(preset.data, dataset=str(files["text"]), eval_size=6))
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    tokenizer.pad_token = None  # as Llama-2's: none of its own
    data = causal.tokenize(load_raw(config.data, progress=False), tokenizer, config.data)
    projections = "q_proj+k_proj+v_proj+o_proj+gate_proj+up_proj+down_proj"
    hparams = {"r": 64, "lora_alpha": 16, "target_modules": projections, "learning_rate": 2e-4}
    model = trial.build_model(str(llama_dir), config, hparams)
    lora = model.peft_config["default"]
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (64, 16, 0.05)
    assert set(lora.target_modules) == set(projections.split("+")) and not lora.modules_to_save
    quant = model.get_base_model().config.quantization_config
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    assert (quant["bnb_4bit_quant_type"], quant["bnb_4bit_use_double_quant"], quant["bnb_4bit_compute_dtype"]) == (
        "nf4", True, "bfloat16")
    with tempfile.TemporaryDirectory() as work_dir:
        trainer = trial.build_trainer(model, tokenizer, data, config, work_dir, hparams["learning_rate"])
        args = trainer.args
        # the recipe's effective batch 10 (5 x 2; the preset may split it otherwise for speed)
        assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (
            config.train.batch_size, config.train.gradient_accumulation_steps)
        assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 10
        assert args.learning_rate == 2e-4
        assert (args.weight_decay, args.max_grad_norm, args.max_steps) == (0.001, 0.3, 270)
        assert args.lr_scheduler_type.value == "constant_with_warmup" and args.warmup_steps == math.ceil(0.03 * 270)
        assert args.optim.value == "paged_adamw_32bit" and args.bf16
        assert getattr(args, "activation_checkpointing", getattr(args, "gradient_checkpointing", None)) is True
        assert args.packing and args.max_length == 512
        # pad = EOS (the tokenizer has none), packed rows: TRL's padding-free collator, no padding at all
        assert tokenizer.pad_token_id == tokenizer.eos_token_id == trainer.data_collator.pad_token_id
        assert trainer.data_collator.padding_free
        assert set(trainer.train_dataset.column_names) >= {"input_ids", "seq_lengths"}
        assert len(trainer.train_dataset) < len(data.train["input_ids"])  # several rows to a packed row


# --- errors: a bad sweep stops with a ConfigError before Ray starts ---------------------------------


def _write(tmp_path: Path, records: list[dict]) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _turns(*pairs) -> list[dict]:
    return [{"role": role, "content": content} for role, content in pairs]


@pytest.mark.parametrize(("records", "settings", "expected"), [
    ([{"messages": "hello"}] * 10, {"format": "messages"}, "not chat turns"),
    ([{"messages": _turns(("user", "q"), ("assistant", "a"))}] * 9 + [{"messages": [{"role": "user"}]}],
     {}, "turn 0: expected {'role': str, 'content': str}"),
    ([{"messages": _turns(("user", "q"), ("assistant", "a"), ("user", "more?"))}] * 10, {},
     "the last turn must be the assistant's"),
    ([{"messages": _turns(("user", "q"), ("robot", "a"))}] * 10, {}, "unknown role 'robot'"),
    ([{"messages": _turns(("user", "q"), ("assistant", " "))}] * 10, {}, "no rows with non-empty 'messages'"),
    ([{"dialog": _turns(("user", "q"), ("assistant", "a"))}] * 10, {"format": "messages"},
     "column 'messages' (--messages-column) not in"),
    ([{"text": 3, "other": 4}] * 10, {"format": "text"}, "holds Value('int64'), not text"),
    ([{"text": "  "}] * 10, {}, "no rows with non-empty 'text'"),
    ([{"prompt": "a", "completion": "b"}] * 10, {}, "column 'text' (--text-column) not in"),
])
def test_bad_rows_are_config_errors(tmp_path, records, settings, expected):
    with pytest.raises(ConfigError) as error:
        load_raw(DataSettings(dataset=str(_write(tmp_path, records)), **settings), progress=False)
    assert expected in str(error.value)


def test_messages_need_a_chat_template(tokenizer, files):
    from transformers import AutoTokenizer

    bare = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    bare.chat_template = None
    settings = _settings(files["messages"], messages_column="conversation")
    raw = load_raw(settings, progress=False)
    with pytest.raises(ConfigError, match="has no chat template.*data.chat_template"):
        causal.tokenize(raw, bare, settings)
    assert causal.tokenize(raw, bare, dataclasses.replace(settings, chat_template=OTHER_TEMPLATE)).train["input_ids"]
    strict = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ConfigError, match="does not fit the chat template .roles must alternate"):
        causal.tokenize(raw, tokenizer, dataclasses.replace(settings, chat_template=strict))
    with pytest.raises(ConfigError, match="no train conversation fits --max-source-length 8"):
        causal.tokenize(raw, tokenizer, dataclasses.replace(settings, max_source_length=8))


def test_format_and_metric_and_task_must_agree():
    with pytest.raises(ConfigError, match="text has no completions to score with rougeL: use --metric eval_loss"):
        load_config("llama2-7b-sft", overrides={"search": {"metric": "rougeL", "mode": "max"}})
    with pytest.raises(ConfigError, match="a seq2seq model trains on prompt-completion pairs"):
        load_config(overrides={"model": {"task": "seq2seq"}, "data": {"format": "messages"}})
    with pytest.raises(ConfigError, match="data format must be one of"):
        load_config(overrides={"data": {"format": "chat"}})


def test_cli_text_data_with_a_rouge_metric_fails_before_ray(llama_dir, files, tmp_path):
    """format auto resolves to text from the file's columns; the default metric (rougeL) is then an error."""
    proc = run_cli("--preset", "tiny-llama-stdlib", "--model", str(llama_dir), "--dataset", str(files["text"]),
                   "--output-dir", str(tmp_path))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--data-format text has no completions to score with rougeL" in errors[0]
    assert "Traceback" not in proc.stderr and "Ray instance" not in proc.stdout + proc.stderr
