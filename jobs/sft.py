"""Supervised fine-tuning with TRL's SFTTrainer inside Ray Train workers.

    python -m jobs.sft --config jobs/configs/sft_tiny.yaml
    ray job submit --working-dir . -- python -m jobs.sft --config jobs/configs/sft_tiny.yaml

Data: the task's prompt/completion pairs (loss on the completion only, TRL's default for that format), or any
local dataset in one of TRL's SFT formats. Prints held-out exact-match accuracy before and after.
"""

from __future__ import annotations

from pydantic import model_validator

from rayloop.config import Section, run_cli
from rayloop.posttrain import PostTrainConfig


class DatasetSection(Section):
    path: str | None = None
    """A dataset (a `datasets.save_to_disk` folder, or .json/.jsonl), local or in storage (`s3://...`), in a TRL
    format; unset: the task's."""


class SFTJobConfig(PostTrainConfig):
    """Supervised fine-tuning (TRL SFTTrainer) on Ray Train."""

    job_name = "sft"
    dataset: DatasetSection = DatasetSection()

    @model_validator(mode="after")
    def _dataset_exists(self):
        from rayloop import storage

        if self.dataset.path is not None and not storage.exists(storage.normalize(self.dataset.path)):
            raise ValueError(f"dataset.path: no such file or folder {self.dataset.path!r}")
        return self


def load_dataset(cfg: SFTJobConfig, examples: list[dict]):
    """The configured local dataset, or `examples` (the task's), as a datasets.Dataset."""
    import datasets

    if cfg.dataset.path is None:
        return datasets.Dataset.from_list(examples)
    from pathlib import Path

    from rayloop.storage import local_copy

    path = Path(local_copy(cfg.dataset.path))  # on the worker: from storage, through this node's cache
    if path.is_dir():
        return datasets.load_from_disk(str(path))
    return datasets.load_dataset("json", data_files=str(path), split="train")


def build_trainer(cfg: SFTJobConfig, model_dir: str, args: dict):
    from trl import SFTConfig, SFTTrainer

    from rayloop.tasks import ArithmeticTask

    return SFTTrainer(
        model=model_dir,
        args=SFTConfig(**args, max_length=cfg.train.max_length),
        train_dataset=load_dataset(cfg, ArithmeticTask(cfg.task).sft_examples()),
    )


def main(cfg: SFTJobConfig) -> dict:
    from jobs import sft
    from rayloop import storage
    from rayloop.evaluate import compare_exact_match, describe
    from rayloop.posttrain import fit
    from rayloop.tasks import ArithmeticTask

    summary = fit(cfg, sft.build_trainer, plot_keys=["loss", "eval_exact_match"], plot_name="loss")
    summary["exact_match"] = compare_exact_match(cfg.model.name_or_path, summary["model_dir"],
                                                 ArithmeticTask(cfg.task).eval_examples(), use_gpu=cfg.scaling.use_gpu)
    print(f"sft: step {summary.get('step')}, {describe('held-out exact match', summary['exact_match'])}, "
          f"model at {summary['model_dir']}")
    storage.write_json(cfg.storage.run_path("results.json"), summary)
    return summary


if __name__ == "__main__":
    from jobs import sft

    run_cli(sft.SFTJobConfig, sft.main)
