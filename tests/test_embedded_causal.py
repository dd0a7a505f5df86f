"""The offline tiny causal LM: tokenizer and chat template, determinism, cache, 4-bit load, LoRA, SFT headroom."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from qlora_ray import embedded, embedded_causal
from qlora_ray.embedded_causal import EOS, INSTRUCTION, PROMPT_TEMPLATE

MAX_LENGTH = 320  # the causal trial's row length


@pytest.fixture(scope="module")
def causal_dir(cache_dir: Path) -> Path:
    """The default build, in the session cache (QLORA_RAY_TEST_CACHE reuses an earlier one)."""
    return embedded_causal.build_tiny_causal(cache_dir)


@pytest.fixture(scope="module")
def tokenizer(causal_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(causal_dir)


@pytest.fixture(scope="module")
def corpus_rows(cache_dir: Path) -> dict[str, list[dict]]:
    corpus = embedded.build_corpus(cache_dir)
    return {split: embedded.load_corpus(corpus, split) for split in ("train", "eval")}


@pytest.fixture
def one_thread():
    """Training tests run as a trial does (one CPU): faster on a busy 2-core machine, too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _quantized(causal_dir: Path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        causal_dir, quantization_config=quant, device_map="cpu", dtype=torch.float32
    )
    for module in model.modules():  # as qlora_ray.model.keep_cpu_weights_fixed: no lossy repacking on eval
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def test_tokenizer_is_causal_and_has_a_chat_template(tokenizer) -> None:
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.bos_token) == ("<pad>", "</s>", "<s>")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    source = "def f(x):\n    return {'a': x ** 2}  # über\n"
    ids = tokenizer(source).input_ids
    assert ids[0] == tokenizer.bos_token_id and tokenizer.eos_token_id not in ids and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == source
    assert tokenizer("x" + EOS).input_ids[-1] == tokenizer.eos_token_id  # TRL appends the EOS as text

    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U"},
        {"role": "assistant", "content": "A"},
    ]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == (
        "<s><|system|>\nS\n<|user|>\nU\n<|assistant|>\nA</s>"
    )
    assert tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True) == (
        "<s><|system|>\nS\n<|user|>\nU\n<|assistant|>\n"
    )
    # The assistant turn is marked for TRL's assistant_only_loss.
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    marked = [t for t, m in zip(out["input_ids"], out["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(marked) == "A</s>"
    assert tokenizer.decode(tokenizer("<|user|> hi").input_ids, skip_special_tokens=True) == " hi"


def test_instruction_pairs(tokenizer, corpus_rows) -> None:
    rows = corpus_rows["train"][:200]
    pairs = embedded_causal.instruction_pairs(rows)
    assert pairs[0] == {
        "prompt": f"{INSTRUCTION}\n\n{rows[0]['text']}\n\nSummary:",
        "completion": f" {rows[0]['summary']}</s>",
    }
    assert PROMPT_TEMPLATE.format(source="X") == "Summarize this Python definition in one sentence:\n\nX\n\nSummary:"

    fitted = embedded_causal.instruction_pairs(rows, tokenizer=tokenizer, max_length=64)
    cut = 0
    for row, pair, full in zip(rows, fitted, pairs, strict=True):
        prompt_ids = tokenizer(pair["prompt"]).input_ids
        ids = tokenizer(pair["prompt"] + pair["completion"]).input_ids
        # At most 64 tokens, unless the completion alone does not fit: then the source is emptied.
        assert len(ids) <= 64 or pair["prompt"] == PROMPT_TEMPLATE.format(source=""), pair
        assert ids[: len(prompt_ids)] == prompt_ids  # TRL's completion mask starts right after the prompt
        assert tokenizer.decode(ids[len(prompt_ids) :]) == f" {row['summary']}</s>"
        assert pair["completion"] == full["completion"] and pair["prompt"].endswith("\n\nSummary:")
        cut += pair != full
    assert cut > 50  # most sources are longer than 64 tokens

    messages = embedded_causal.instruction_messages(rows[:1])[0]["messages"]
    assert messages == [
        {"role": "user", "content": f"{INSTRUCTION}\n\n{rows[0]['text']}"},
        {"role": "assistant", "content": rows[0]["summary"]},
    ]
    chat = tokenizer.apply_chat_template(messages, tokenize=False)
    assert chat == f"<s><|user|>\n{INSTRUCTION}\n\n{rows[0]['text']}\n<|assistant|>\n{rows[0]['summary']}</s>"
    for row in embedded_causal.instruction_messages(rows, tokenizer=tokenizer, max_length=64):
        out = tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)
        assert len(out["input_ids"]) <= 64 or row["messages"][0]["content"] == f"{INSTRUCTION}\n\n"


def test_build_is_deterministic_and_cached(cache_dir: Path, causal_dir: Path, tmp_path: Path) -> None:
    """Two builds in fresh directories give the same bytes (a few pretraining steps: the same code
    path as the default build); the default build is reused, not rebuilt."""
    corpus = embedded.build_corpus(cache_dir)
    dirs = [
        embedded_causal.build_tiny_causal(tmp_path / name, corpus=corpus, pretrain_steps=2, progress=False)
        for name in ("a", "b")
    ]
    first, second = (_digest(d) for d in dirs)
    assert first == second
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= first.keys()
    # Same corpus, same tokenizer and config as the default build (only the weights differ).
    default = _digest(causal_dir)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert first[name] == default[name], name

    mtime = (causal_dir / "model.safetensors").stat().st_mtime_ns
    assert embedded_causal.build_tiny_causal(cache_dir, progress=False) == causal_dir
    assert (causal_dir / "model.safetensors").stat().st_mtime_ns == mtime
    assert causal_dir.name.startswith("tiny-llama-stdlib-") and causal_dir.parent == cache_dir
    assert embedded_causal.EMBEDDED_CAUSAL_MODEL == "embedded:tiny-llama"


def test_model_config(causal_dir: Path, tokenizer) -> None:
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(causal_dir)
    generation = GenerationConfig.from_pretrained(causal_dir)
    assert (generation.eos_token_id, generation.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
    for key, value in embedded_causal.GENERATION_DEFAULTS.items():  # the shipped generation defaults, if any
        assert getattr(generation, key) == value
    assert config.model_type == "llama" and not config.tie_word_embeddings
    assert config.vocab_size >= len(tokenizer) and config.vocab_size % 64 == 0
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    assert config.max_position_embeddings == 1024
    # Every Linear's in_features is a multiple of 64 (bitsandbytes 4-bit blocks).
    assert config.hidden_size % 64 == 0 and config.intermediate_size % 64 == 0


def test_loads_in_4bit_and_generates(causal_dir: Path, tokenizer) -> None:
    model = _quantized(causal_dir)
    layer = model.model.layers[0]
    assert type(layer.self_attn.q_proj).__name__ == "Linear4bit"
    assert type(layer.mlp.down_proj).__name__ == "Linear4bit"
    prompts = [embedded_causal.instruction_prompt("def add(a, b):\n    return a + b"), "def f():"]
    batch = tokenizer(prompts, padding=True, return_tensors="pt")  # left padding
    assert batch.input_ids[1, 0] == tokenizer.pad_token_id
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False)
    new = out[:, batch.input_ids.shape[1] :]
    assert new.shape[0] == 2 and 1 <= new.shape[1] <= 8
    assert all(isinstance(t, str) for t in tokenizer.batch_decode(new, skip_special_tokens=True))

    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "def f():\n    return 1"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**chat, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > chat["input_ids"].shape[1]


def test_lora_on_4bit_trains(causal_dir: Path, tokenizer, corpus_rows, one_thread) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(
        _quantized(causal_dir),
        LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    pairs = embedded_causal.instruction_pairs(corpus_rows["train"][:8], tokenizer=tokenizer, max_length=128)
    tokenizer.padding_side = "right"
    try:
        batch = tokenizer([p["prompt"] + p["completion"] for p in pairs], padding=True, return_tensors="pt")
    finally:
        tokenizer.padding_side = "left"
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    opt = torch.optim.AdamW(trainable, lr=3e-3)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    # It learns: about 6% lower after 8 steps here (the exact figure moves a little with the built model's
    # floating-point history, so the bound is loose; without training the loss stays where it is).
    assert losses[-1] < 0.97 * losses[0] and min(losses) < losses[0], losses


def test_sft_beats_the_base(causal_dir: Path, tokenizer, corpus_rows, tmp_path: Path, one_thread) -> None:
    """A short 4-bit LoRA SFT (TRL, prompt-completion data, completion-only loss) lowers the held-out
    loss well below the base's and raises ROUGE-L: there is headroom for a sweep."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from qlora_ray.metrics import rouge

    steps, batch_size = 60, 8
    train = corpus_rows["train"][: steps * batch_size]
    held_out = corpus_rows["eval"][:48]
    train_pairs = embedded_causal.instruction_pairs(train, tokenizer=tokenizer, max_length=MAX_LENGTH)
    eval_pairs = embedded_causal.instruction_pairs(held_out, tokenizer=tokenizer, max_length=MAX_LENGTH)
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=16,
        learning_rate=2e-3,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=5,
        max_length=MAX_LENGTH,
        packing=False,
        completion_only_loss=True,
        bf16=False,  # TRL's default is True
        gradient_checkpointing=False,  # TRL's default is True
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_steps=10,
        seed=0,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=_quantized(causal_dir),
        args=args,
        train_dataset=Dataset.from_list(train_pairs),
        eval_dataset=Dataset.from_list(eval_pairs),
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
        ),
    )
    # Completion-only loss: the labels cover the completion and its EOS, nothing of the prompt.
    row = trainer.train_dataset[0]
    completion = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
    assert tokenizer.decode(completion) == train_pairs[0]["completion"]

    def greedy_rouge_l() -> float:
        trainer.model.eval()
        predictions = []
        for i in range(0, len(eval_pairs), 16):
            batch = tokenizer([p["prompt"] for p in eval_pairs[i : i + 16]], padding=True, return_tensors="pt")
            with torch.no_grad():
                out = trainer.model.generate(**batch, max_new_tokens=40, do_sample=False)
            predictions += tokenizer.batch_decode(out[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
        return rouge([p.strip() for p in predictions], [r["summary"] for r in held_out])["rougeL"]

    base_loss, base_rouge = trainer.evaluate()["eval_loss"], greedy_rouge_l()
    trainer.train()
    tuned_loss, tuned_rouge = trainer.evaluate()["eval_loss"], greedy_rouge_l()
    print(f"eval loss {base_loss:.3f} -> {tuned_loss:.3f}, ROUGE-L {base_rouge:.3f} -> {tuned_rouge:.3f}")
    assert tuned_loss < base_loss - 0.5
    assert tuned_rouge > base_rouge
