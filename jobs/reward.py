"""Reward-model training with TRL's RewardTrainer inside Ray Train workers.

    python -m jobs.reward --config jobs/configs/reward_tiny.yaml
    ray job submit --working-dir . -- python -m jobs.reward --config jobs/configs/reward_tiny.yaml

Starts from a causal LM folder (TRL puts a one-output classification head on it), learns to score the right answer
above a plausible wrong one, and reports preference accuracy on held-out pairs. GRPO uses the result with
`rewards: [{name: reward_model, path: <this run>}]`.
"""

from __future__ import annotations

from pydantic import Field

from rayloop.config import run_cli
from rayloop.posttrain import PostTrainConfig, PostTrainSection


class RewardJobConfig(PostTrainConfig):
    """Reward model (TRL RewardTrainer) on preference pairs, on Ray Train."""

    job_name = "reward"
    # A scalar-output model cannot answer the task, so no generated held-out accuracy; its eval is pair accuracy.
    train: PostTrainSection = PostTrainSection(eval_samples=0)
    rejected_per_problem: int = Field(default=1, ge=1)
    """Preference pairs per training problem, each with its own wrong answer: a small model needs many pairs to
    learn to check an answer rather than judge its surface."""


def build_trainer(cfg: RewardJobConfig, model_dir: str, args: dict):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from rayloop.tasks import ArithmeticTask

    task = ArithmeticTask(cfg.task)
    return RewardTrainer(
        model=model_dir,
        args=RewardConfig(**args, max_length=cfg.train.max_length, eval_strategy="steps",
                          eval_steps=cfg.train.checkpoint_every),
        train_dataset=Dataset.from_list(task.preference_pairs(cfg.rejected_per_problem)),
        eval_dataset=Dataset.from_list(task.eval_preference_pairs()),
    )


def main(cfg: RewardJobConfig) -> dict:
    from jobs import reward
    from rayloop import storage
    from rayloop.posttrain import fit

    summary = fit(cfg, reward.build_trainer, plot_keys=["accuracy", "eval_accuracy"], plot_name="accuracy")
    print(f"reward: step {summary.get('step')}, held-out preference accuracy "
          f"{summary.get('eval_accuracy', float('nan')):.1%} on {cfg.task.num_eval} pairs, "
          f"model at {summary['model_dir']}")
    storage.write_json(cfg.storage.run_path("results.json"), summary)
    return summary


if __name__ == "__main__":
    from jobs import reward

    run_cli(reward.RewardJobConfig, reward.main)
