"""Direct preference optimisation with TRL's DPOTrainer inside Ray Train workers.

    python -m jobs.dpo --config jobs/configs/dpo_tiny.yaml
    ray job submit --working-dir . -- python -m jobs.dpo --config jobs/configs/dpo_tiny.yaml

Pairs: the task's right answer (chosen) against a plausible wrong one (rejected); the reference model is the
starting model. Prints, against that start, held-out preference accuracy (the policy gives the right answer more
probability than the wrong one) and exact-match accuracy, both paired on the same held-out problems.
"""

from __future__ import annotations

from pydantic import Field

from rayloop.config import run_cli
from rayloop.posttrain import PostTrainConfig


class DPOJobConfig(PostTrainConfig):
    """Direct preference optimisation (TRL DPOTrainer) on Ray Train."""

    job_name = "dpo"
    beta: float = Field(default=0.1, gt=0)
    """DPO's temperature: how far the policy may move from the reference."""


def build_trainer(cfg: DPOJobConfig, model_dir: str, args: dict):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from rayloop.tasks import ArithmeticTask

    task = ArithmeticTask(cfg.task)
    return DPOTrainer(
        model=model_dir,
        args=DPOConfig(**args, beta=cfg.beta, max_length=cfg.train.max_length, eval_strategy="steps",
                       eval_steps=cfg.train.checkpoint_every),
        train_dataset=Dataset.from_list(task.preference_pairs()),
        eval_dataset=Dataset.from_list(task.eval_preference_pairs()),
    )


def main(cfg: DPOJobConfig) -> dict:
    from jobs import dpo
    from rayloop import storage
    from rayloop.evaluate import compare_exact_match, describe, on_ray, paired_difference, preference_scores
    from rayloop.posttrain import fit
    from rayloop.tasks import ArithmeticTask

    task = ArithmeticTask(cfg.task)
    summary = fit(cfg, dpo.build_trainer, plot_keys=["rewards/margins", "eval_rewards/margins"], plot_name="margins")
    pairs, gpu = task.eval_preference_pairs(), cfg.scaling.use_gpu
    summary["preference"] = paired_difference(on_ray(preference_scores, cfg.model.name_or_path, pairs, use_gpu=gpu),
                                              on_ray(preference_scores, summary["model_dir"], pairs, use_gpu=gpu))
    summary["exact_match"] = compare_exact_match(cfg.model.name_or_path, summary["model_dir"], task.eval_examples(),
                                                 use_gpu=gpu)
    print(f"dpo: step {summary.get('step')}, {describe('held-out preference accuracy', summary['preference'])}; "
          f"{describe('exact match', summary['exact_match'])}; model at {summary['model_dir']}")
    storage.write_json(cfg.storage.run_path("results.json"), summary)
    return summary


if __name__ == "__main__":
    from jobs import dpo

    run_cli(dpo.DPOJobConfig, dpo.main)
