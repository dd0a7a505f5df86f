"""The batching engine on decoder-only models (no Serve): a mixed-adapter batch, rows joining at
different times and prompt lengths, each row's tokens equal to transformers' generate through
PEFT with that adapter alone. Real 4-bit models: a Llama with grouped-query attention and a Phi
(partial rotary, parallel attention and MLP), random weights from small configs.

On a machine with a GPU the engine runs there, with its CUDA-graph decode step."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from qlora_ray.adapter_check import BaseSpec
from qlora_ray.config import ModelSettings
from qlora_ray.model import load_base_model
from qlora_ray.registry import Candidate, Registry
from qlora_ray.serving.adapter_store import AdapterStore
from qlora_ray.serving.engine import Engine, Row, compute_dtype
from qlora_ray.serving.multi_lora import SlotContext

CUDA = torch.cuda.is_available()
NEW_TOKENS = 12
PROMPTS = [[5, 17, 33, 2, 9], [7], [100, 200, 300, 400, 11, 12, 13, 14, 15, 16, 17, 18, 19], [42, 43]]
# fp32 compute on a GPU too: random weights leave near-ties that bf16 rounding would flip either way.
LOAD = ModelSettings(compute_dtype="float32")


def build(kind: str, path):
    from transformers import LlamaConfig, LlamaForCausalLM, PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    common = {"vocab_size": 512, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 4, "max_position_embeddings": 128, "initializer_range": 0.2}
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **common))
        targets = [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]]
    else:
        model = PhiForCausalLM(PhiConfig(partial_rotary_factor=0.5, **common))
        targets = [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]]
    model.save_pretrained(path / "base")
    return targets


@pytest.fixture(scope="module", params=["llama", "phi"])
def setup(request, tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    work = tmp_path_factory.mktemp(request.param)
    targets = build(request.param, work)
    base_path = str(work / "base")
    candidates = []
    for i, (r, modules) in enumerate(zip((4, 8), targets, strict=True)):
        model = get_peft_model(load_base_model(base_path, LOAD),
                               LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=2 * r, target_modules=modules,
                                          init_lora_weights=False))
        with torch.no_grad():  # random adapters that change the output visibly
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.5)
        adapter_id = f"a{i}"
        model.save_pretrained(work / "src" / adapter_id)
        candidates.append(Candidate(adapter_id, work / "src" / adapter_id, {"rougeL": 0.1 * i}, {}, str(i), 1))
    registry = Registry(work / "registry")
    registry.publish(candidates, base_model=base_path, base_metrics={}, metric="rougeL", mode="max", sweep="s",
                     task={"max_source_length": 32, "max_target_length": 16})
    return {"path": base_path, "registry": registry}


def reference(setup, adapter_id: str | None, prompt: list[int]) -> list[int]:
    """transformers' greedy generate, through PEFT with this adapter alone."""
    from peft import PeftModel

    model = load_base_model(setup["path"], LOAD)
    if adapter_id:
        model = PeftModel.from_pretrained(model, str(setup["registry"].root / adapter_id))
    model.eval()
    ids = torch.tensor([prompt], device=next(model.parameters()).device)
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


class Ids:
    """A tokenizer stand-in for the engine's text reporting: these tests compare token ids."""

    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True) -> str:
        return " ".join(map(str, ids))


def make_engine(setup, *, batch_invariant: bool):
    model = load_base_model(setup["path"], LOAD)
    model.eval()
    base = BaseSpec.from_model(model, setup["path"])
    device = next(p for p in model.parameters() if p.is_floating_point()).device
    engine = Engine(model, Ids(), SlotContext(4, device, compute_dtype(model)), max_rows=4, max_source=32,
                    max_new=16, max_queued=32, cuda_graphs=CUDA, batch_invariant=batch_invariant)
    engine.eos = set()  # random weights: compare full lengths
    store = AdapterStore(engine, base, setup["registry"], base_model=setup["path"], max_bytes=10**9,
                         load_settings={"quant_type": "nf4", "double_quant": True})
    return engine, store


def run(engine: Engine, rows: list[Row], stagger: float) -> None:
    done = threading.Semaphore(0)
    for r in rows:
        r.on_event = lambda _row, _text, finished: done.release() if finished else None
    for r in rows:  # one by one: each joins the running batch between steps
        engine.submit([r])
        time.sleep(stagger)
    for _ in rows:
        assert done.acquire(timeout=120)


@pytest.mark.parametrize("batch_invariant", [True] if CUDA else [True, False])
def test_mixed_batch_equals_each_request_alone(setup, batch_invariant):
    engine, store = make_engine(setup, batch_invariant=batch_invariant)
    try:
        slots = {None: 0}
        for adapter_id in ("a0", "a1"):
            store.load_blocking(adapter_id)
            slots[adapter_id] = store.resident[adapter_id].slot
        # Every prompt with every adapter and the bare base, more rows than the batch holds.
        cases = [(adapter_id, p) for p in PROMPTS for adapter_id in (None, "a0", "a1")]
        rows = [Row(input_ids=p, slot=slots[a], max_new_tokens=NEW_TOKENS, on_event=None) for a, p in cases]
        run(engine, rows, stagger=0.02)
        for (adapter_id, prompt), r in zip(cases, rows, strict=True):
            assert r.error is None
            assert r.tokens == reference(setup, adapter_id, prompt), (adapter_id, prompt)
        # the adapters change the output: the comparison above is not base against base
        assert len({tuple(r.tokens) for r in rows[:3]}) == 3
    finally:
        engine.close()


def test_prompt_and_new_tokens_must_fit_the_positions(setup):
    model = load_base_model(setup["path"], LOAD)
    with pytest.raises(ValueError, match="positions"):
        Engine(model, Ids(), SlotContext(2, torch.device("cpu"), compute_dtype(model)), max_rows=2, max_source=100,
               max_new=100, max_queued=4, cuda_graphs=False)
