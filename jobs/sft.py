"""Supervised fine-tuning with TRL's SFTTrainer inside Ray Train workers.

    python -m jobs.sft --config jobs/configs/sft_tiny.yaml
    ray job submit --working-dir . -- python -m jobs.sft --config jobs/configs/sft_tiny.yaml

Data: `dataset.path`, in TRL's prompt-completion format (loss on the completion only, TRL's default) or language
modeling format (`text`, or conversational `messages`), else the arithmetic task's prompt/completion pairs.
Prints, against the starting model and paired on the same held-out rows: the eval loss and perplexity, and on the
task's data greedy exact-match accuracy.
"""

from __future__ import annotations

from pydantic import model_validator

from rayloop.config import run_cli
from rayloop.console import say
from rayloop.posttrain import PostTrainConfig


class SFTJobConfig(PostTrainConfig):
    """Supervised fine-tuning (TRL SFTTrainer) on Ray Train."""

    job_name = "sft"
    data_format = "sft"
    trl_reserved = {"max_length": "train.max_length", "eval_strategy": "train.checkpoint_every",
                    "eval_steps": "train.checkpoint_every"}

    def trl_config_class(self):
        from trl import SFTConfig

        return SFTConfig

    @model_validator(mode="after")
    def _assistant_only_loss_needs_conversations(self):
        if self.trl.overrides.get("assistant_only_loss") and self.dataset.path is None:
            raise ValueError("trl.overrides.assistant_only_loss: the task's data are plain prompt-completion "
                             "strings, with no assistant turns (TRL's completion_only_loss, on by default, already "
                             "trains on the completions only)")
        return self

    def task_data(self):
        from rayloop.tasks import ArithmeticTask

        task = ArithmeticTask(self.task)
        held_out = [{"prompt": e["prompt"], "completion": e["answer"]} for e in task.eval_examples()]
        return task.sft_examples(), held_out


def build_trainer(cfg: SFTJobConfig, model_dir: str, args: dict):
    from trl import SFTTrainer

    from rayloop.trl_config import build

    train, held_out = cfg.data()
    return SFTTrainer(
        model=model_dir,
        args=build(cfg.trl_config_class(), {**args, "max_length": cfg.train.max_length, "eval_strategy": "steps",
                                            "eval_steps": cfg.train.checkpoint_every}, cfg.trl.overrides),
        train_dataset=train,
        eval_dataset=held_out,
        peft_config=cfg.peft_config(),
    )


def main(cfg: SFTJobConfig) -> dict:
    import math

    from jobs import sft
    from rayloop import storage
    from rayloop.evaluate import compare_exact_match, compare_on_ray, describe, loss_scores
    from rayloop.posttrain import fit
    from rayloop.registry import register

    summary = fit(cfg, sft.build_trainer, plot_keys=["loss", "eval_loss", "eval_exact_match"], plot_name="loss")
    _, held_out = cfg.data()
    gpu = cfg.scaling.use_gpu
    say(f"sft: held-out evaluation of the start and trained models ({len(held_out)} examples)")
    loss = summary["held_out_loss"] = compare_on_ray(loss_scores, cfg.model.name_or_path, summary["model_dir"],
                                                         held_out.to_list(), use_gpu=gpu)
    summary["perplexity"] = {"before": math.exp(loss["before"]), "after": math.exp(loss["after"])}
    line = (f"sft: step {summary.get('step')}, held-out loss {loss['before']:.3f} -> {loss['after']:.3f} "
            f"(95% CI of the difference [{loss['ci_low']:+.3f}, {loss['ci_high']:+.3f}], n={loss['n']}), "
            f"perplexity {summary['perplexity']['before']:.2f} -> {summary['perplexity']['after']:.2f}")
    if cfg.dataset.path is None:  # the task's data carries answers
        from rayloop.tasks import ArithmeticTask

        summary["exact_match"] = compare_exact_match(cfg.model.name_or_path, summary["model_dir"],
                                                     ArithmeticTask(cfg.task).eval_examples(), use_gpu=gpu)
        line += f"; {describe('held-out exact match', summary['exact_match'])}"
    say(f"{line}, model at {summary['model_dir']}")
    summary["model_version"] = register(cfg, summary, job="sft", parent=cfg.model.name_or_path)
    storage.write_json(cfg.storage.run_path("results.json"), summary)
    return summary


if __name__ == "__main__":
    from jobs import sft

    run_cli(sft.SFTJobConfig, sft.main)
