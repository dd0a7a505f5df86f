"""Random-weight checkpoints of a real architecture, for machines that cannot reach the hub.

A trial's speed and memory depend on the architecture and shapes, not on the weight values,
so `--random-init` lets a machine without hub access run, time and test the real model:
the architecture's config (shipped for known hub ids, or read from a local directory) is
instantiated with random weights, saved once as an ordinary local checkpoint (bf16
safetensors, plus a tokenizer trained on the embedded corpus), and from then on loaded like
any other model. Its summaries are noise; its ROUGE says nothing about the recipe.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from qlora_ray.config import ConfigError

# Hub ids whose architecture config ships with the package (qlora_ray/architectures/).
KNOWN_ARCHITECTURES = {
    "google-t5/t5-3b": "t5-3b.json",
    "t5-3b": "t5-3b.json",
    "microsoft/phi-2": "phi-2.json",
    "meta-llama/Llama-2-7b-hf": "llama-2-7b.json",
}
FORMAT_VERSION = "v1"


def architecture_config(name: str) -> dict:
    """The model config for `name`: a shipped one, or `config.json` in a local directory/file."""
    if name in KNOWN_ARCHITECTURES:
        text = (resources.files("qlora_ray") / "architectures" / KNOWN_ARCHITECTURES[name]).read_text()
        return json.loads(text)
    path = Path(name).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
    raise ConfigError(
        f"--random-init needs an architecture config: {name!r} is neither a known id "
        f"({', '.join(KNOWN_ARCHITECTURES)}) nor a local config.json or directory holding one"
    )


def build_random_model(name: str, cache_dir: Path, *, seed: int = 0, progress: bool = True) -> Path:
    """Build (once, cached by config and seed) a random-weight checkpoint; return its directory."""
    import torch
    from transformers import AutoConfig

    from qlora_ray import embedded, tasks

    config_dict = architecture_config(name)
    key = hashlib.sha1(json.dumps(config_dict, sort_keys=True).encode()).hexdigest()[:10]
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in name.strip("/"))[-60:]
    out = Path(cache_dir) / f"random-{slug}-{key}-seed{seed}-{FORMAT_VERSION}"
    if (out / "config.json").is_file():
        return out
    with embedded._file_lock(Path(cache_dir) / ".random-init.lock"):
        if (out / "config.json").is_file():
            return out
        corpus = embedded.build_corpus(Path(cache_dir), progress=progress)
        rows = embedded.load_corpus(corpus, "train")
        tokenizer = embedded.train_tokenizer([r["text"] for r in rows] + [r["summary"] for r in rows])
        config_dict = dict(config_dict, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                           decoder_start_token_id=tokenizer.pad_token_id)
        model_type = config_dict.pop("model_type", None)
        if model_type is None:
            raise ConfigError(f"{name}: the config has no model_type")
        config = AutoConfig.for_model(model_type, **config_dict)
        if config.vocab_size < len(tokenizer):
            raise ConfigError(f"{name}: vocab_size {config.vocab_size} < the tokenizer's {len(tokenizer)} tokens")
        device = "cuda" if torch.cuda.is_available() else "cpu"  # a 3B init takes seconds on a GPU
        embedded._log(progress, f"building {name} with random weights (seed {seed}) on {device}")
        torch.manual_seed(seed)
        with torch.device(device):
            model = tasks.model_class(config).from_config(config, dtype=torch.bfloat16)
        tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{out.name}."))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / "RANDOM_WEIGHTS.txt").write_text(
                f"Random weights for the architecture of {name} (seed {seed}), built by qlora-ray --random-init.\n"
            )
            for path in [tmp, *tmp.iterdir()]:
                path.chmod(0o755 if path.is_dir() else 0o644)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        del model
        n = sum(1 for _ in out.iterdir())
        embedded._log(progress, f"saved the random-weight checkpoint ({n} files) -> {out}")
    return out
