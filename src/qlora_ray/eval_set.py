"""How many held-out examples each evaluation scores: all of them, or a set that grows with the trial.

With train.eval_set "growing", evaluation k of a trial's K scores the first k/K of the eval set (rounded up, at
least MIN_EXAMPLES; the last evaluation, and any evaluation outside training, scores all of it). ASHA
compares trials at the same evaluation, so on the same examples, and a trial it stops at its first rung
cost 1/K of a full evaluation to judge. Each report says how many examples it scored (`eval_examples`);
only evaluations of the whole set compete for a trial's kept checkpoint and its place on the leaderboard
(`score`), so a lucky score on a few examples never outranks a full one.
"""

from __future__ import annotations

import math

from qlora_ray.config import Config

MIN_EXAMPLES = 16  # below this ROUGE on a subset says too little to compare trials by


def examples_at(step: int, config: Config, total: int) -> int:
    """Examples scored by the evaluation after `step` optimizer steps, of `total` held out."""
    t = config.train
    if t.eval_set != "growing" or step <= 0:  # step 0: an evaluation outside training (the base model's)
        return total
    k = math.ceil(step / t.eval_every)
    if k >= t.num_evals:
        return total
    return min(total, max(MIN_EXAMPLES, math.ceil(total * k / t.num_evals)))


PARTIAL = 1e9  # what a partial evaluation's score gives up: below any full one, still finite (JSON, TensorBoard)


def score(metrics: dict[str, float], metric: str, mode: str, examples: int, total: int) -> float:
    """What a trial's checkpoints are kept and ranked by: the metric when the whole set was scored, else the
    metric moved PARTIAL the wrong way, below every full evaluation (so Tune keeps a trial's best full
    evaluation, or before one its best partial one)."""
    if examples >= total:
        return metrics[metric]
    return metrics[metric] - PARTIAL if mode == "max" else metrics[metric] + PARTIAL


def partial(metrics: dict) -> bool:
    """Whether these reported metrics scored only part of the eval set."""
    return (metrics.get("eval_examples") or 0) < (metrics.get("eval_examples_total") or 0)


class SchedulesEvalSet:
    """Trainer mixin: the Trainer's periodic evaluations score `examples_at(global_step)` examples (the first
    ones of its eval dataset, so every trial at an evaluation is judged on the same ones); an explicit
    `evaluate(eval_dataset=...)` scores all it is given. The metrics gain `<prefix>_examples` (scored) and
    `<prefix>_examples_total`; during an evaluation `eval_examples` is that pair."""

    def __init__(self, *args, eval_schedule: Config, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_schedule = eval_schedule
        self.eval_examples: tuple[int, int] | None = None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval", **kwargs):
        if eval_dataset is None:
            total = len(self.eval_dataset)
            n = examples_at(self.state.global_step, self.eval_schedule, total)
            eval_dataset = self.eval_dataset.select(range(n)) if n < total else None
        else:
            total = n = len(eval_dataset)
        self.eval_examples = (n, total)
        try:
            return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys,
                                    metric_key_prefix=metric_key_prefix, **kwargs)
        finally:
            self.eval_examples = None

    def evaluation_loop(self, *args, **kwargs):
        output = super().evaluation_loop(*args, **kwargs)
        if self.eval_examples is not None:  # (reaches the callbacks' on_evaluate with the other metrics)
            prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
            n, total = self.eval_examples
            output.metrics[f"{prefix}_examples"], output.metrics[f"{prefix}_examples_total"] = n, total
        return output
