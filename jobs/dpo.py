"""Direct preference optimisation with TRL's DPOTrainer inside Ray Train workers.

    python -m jobs.dpo --config jobs/configs/dpo_tiny.yaml
    ray job submit --working-dir . -- python -m jobs.dpo --config jobs/configs/dpo_tiny.yaml

Pairs: `dataset.path` in TRL's preference format (`chosen`, `rejected`, with or without `prompt`; conversational
too), else the task's right answer (chosen) against a plausible wrong one (rejected). The reference model is the
starting model. Prints, against that start and paired on the same held-out pairs: preference accuracy (the policy
gives the chosen completion more probability than the rejected one) and the mean log-probability margin, and on
the task's data exact-match accuracy.
"""

from __future__ import annotations

from pydantic import Field

from rayloop.config import run_cli
from rayloop.console import say
from rayloop.posttrain import PostTrainConfig


class DPOJobConfig(PostTrainConfig):
    """Direct preference optimisation (TRL DPOTrainer) on Ray Train."""

    job_name = "dpo"
    data_format = "dpo"
    trl_reserved = {"max_length": "train.max_length", "eval_strategy": "train.checkpoint_every",
                    "eval_steps": "train.checkpoint_every", "beta": "beta"}
    beta: float = Field(default=0.1, gt=0)
    """DPO's temperature: how far the policy may move from the reference."""

    def trl_config_class(self):
        from trl import DPOConfig

        return DPOConfig

    sequences_per_example = 2  # chosen and rejected, concatenated into one batch

    def memory_workload(self):
        # The reference model is a second copy, unless LoRA's base (the adapter switched off) plays it.
        return super().memory_workload(reference_model=self.lora is None)

    def task_data(self):
        from rayloop.tasks import ArithmeticTask

        task = ArithmeticTask(self.task)
        return task.preference_pairs(), task.eval_preference_pairs()


def build_trainer(cfg: DPOJobConfig, model_dir: str, args: dict):
    from trl import DPOTrainer

    from rayloop.trl_config import build

    train, held_out = cfg.data()
    return DPOTrainer(
        model=model_dir,
        args=build(cfg.trl_config_class(), {**args, "beta": cfg.beta, "max_length": cfg.train.max_length,
                                            "eval_strategy": "steps", "eval_steps": cfg.train.checkpoint_every},
                   cfg.trl.overrides),
        train_dataset=train,
        eval_dataset=held_out,
        peft_config=cfg.peft_config(),
    )


def main(cfg: DPOJobConfig) -> dict:
    from jobs import dpo
    from rayloop import storage
    from rayloop.evaluate import compare_exact_match, compare_preferences, describe, preference_margins
    from rayloop.posttrain import fit
    from rayloop.registry import register

    summary = fit(cfg, dpo.build_trainer, plot_keys=["rewards/margins", "eval_rewards/margins"], plot_name="margins")
    _, held_out = cfg.data()
    margins, summary["preference"] = compare_preferences(preference_margins, cfg.model.name_or_path,
                                                         summary["model_dir"], held_out.to_list(),
                                                         use_gpu=cfg.scaling.use_gpu)
    summary["margin"] = margins
    line = (f"dpo: step {summary.get('step')}, {describe('held-out preference accuracy', summary['preference'])}, "
            f"log-probability margin {margins['before']:+.3f} -> {margins['after']:+.3f} "
            f"(95% CI of the difference [{margins['ci_low']:+.3f}, {margins['ci_high']:+.3f}])")
    if cfg.dataset.path is None:
        from rayloop.tasks import ArithmeticTask

        summary["exact_match"] = compare_exact_match(cfg.model.name_or_path, summary["model_dir"],
                                                     ArithmeticTask(cfg.task).eval_examples(),
                                                     use_gpu=cfg.scaling.use_gpu)
        line += f"; {describe('exact match', summary['exact_match'])}"
    say(f"{line}; model at {summary['model_dir']}")
    summary["model_version"] = register(cfg, summary, job="dpo", parent=cfg.model.name_or_path)
    storage.write_json(cfg.storage.run_path("results.json"), summary)
    return summary


if __name__ == "__main__":
    from jobs import dpo

    run_cli(dpo.DPOJobConfig, dpo.main)
