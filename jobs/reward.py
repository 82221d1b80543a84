"""Reward-model training with TRL's RewardTrainer inside Ray Train workers.

    python -m jobs.reward --config jobs/configs/reward_tiny.yaml
    ray job submit --working-dir . -- python -m jobs.reward --config jobs/configs/reward_tiny.yaml

Starts from a causal LM folder (TRL puts a one-output classification head on it) and learns to score the chosen
completion above the rejected one: `dataset.path` in TRL's preference format (explicit or implicit prompt,
conversational too), else the task's right answer against plausible wrong ones. Prints, against the start (a fresh
head, seeded) and paired on the same held-out pairs: preference accuracy and the mean score margin. GRPO uses the
result with `rewards: [{model: <this run>}]`.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from rayloop.config import run_cli
from rayloop.console import say
from rayloop.posttrain import PostTrainConfig, PostTrainSection


class RewardJobConfig(PostTrainConfig):
    """Reward model (TRL RewardTrainer) on preference pairs, on Ray Train."""

    job_name = "reward"
    data_format = "reward"
    trl_reserved = {"max_length": "train.max_length", "eval_strategy": "train.checkpoint_every",
                    "eval_steps": "train.checkpoint_every"}
    # A scalar-output model cannot answer the task, so no generated held-out accuracy; its eval is pair accuracy.
    train: PostTrainSection = PostTrainSection(eval_samples=0)
    rejected_per_problem: int = Field(default=1, ge=1)
    """The task's data: preference pairs per training problem, each with its own wrong answer (a small model needs
    many pairs to learn to check an answer rather than judge its surface)."""

    @model_validator(mode="after")
    def _no_exact_match_stop(self):
        if self.train.stop_at_exact_match is not None:
            raise ValueError("train.stop_at_exact_match: a reward model scores answers, it does not write them, so "
                             "it has no exact match to stop on")
        return self

    @model_validator(mode="after")
    def _no_lora(self):
        if self.lora is not None:
            raise ValueError("lora: the reward job trains its scoring head and body in full; LoRA is for sft, dpo "
                             "and grpo")
        return self

    sequences_per_example = 2  # chosen and rejected, concatenated into one batch

    def memory_workload(self):
        return super().memory_workload(logits=False)  # one score per sequence, not the vocabulary's logits

    def trl_config_class(self):
        from trl import RewardConfig

        return RewardConfig

    def task_data(self):
        from rayloop.tasks import ArithmeticTask

        task = ArithmeticTask(self.task)
        return task.preference_pairs(self.rejected_per_problem), task.eval_preference_pairs()


def build_trainer(cfg: RewardJobConfig, model_dir: str, args: dict):
    from trl import RewardTrainer

    from rayloop.trl_config import build

    train, held_out = cfg.data()
    return RewardTrainer(
        model=model_dir,
        args=build(cfg.trl_config_class(), {**args, "max_length": cfg.train.max_length, "eval_strategy": "steps",
                                            "eval_steps": cfg.train.checkpoint_every}, cfg.trl.overrides),
        train_dataset=train,
        eval_dataset=held_out,
    )


def main(cfg: RewardJobConfig) -> dict:
    from jobs import reward
    from rayloop import storage
    from rayloop.evaluate import compare_preferences, describe, reward_margins
    from rayloop.posttrain import fit
    from rayloop.registry import register

    summary = fit(cfg, reward.build_trainer, plot_keys=["accuracy", "eval_accuracy"], plot_name="accuracy")
    _, held_out = cfg.data()
    margins, summary["preference"] = compare_preferences(reward_margins, cfg.model.name_or_path,
                                                         summary["model_dir"], held_out.to_list(),
                                                         use_gpu=cfg.scaling.use_gpu)
    summary["margin"] = margins
    say(f"reward: step {summary.get('step')}, {describe('held-out preference accuracy', summary['preference'])}, "
        f"score margin {margins['before']:+.3f} -> {margins['after']:+.3f} (95% CI of the difference "
        f"[{margins['ci_low']:+.3f}, {margins['ci_high']:+.3f}]); model at {summary['model_dir']}")
    summary["model_version"] = register(cfg, summary, job="reward", parent=cfg.model.name_or_path,
                                        default_model="rayloop-reward")
    storage.write_json(cfg.storage.run_path("results.json"), summary)
    return summary


if __name__ == "__main__":
    from jobs import reward

    run_cli(reward.RewardJobConfig, reward.main)
