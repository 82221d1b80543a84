"""The loop on one config: pretrain -> SFT -> GRPO, scoring held-out exact-match accuracy with vLLM at each end.

    python -m jobs.pipeline --config jobs/configs/pipeline_tiny.yaml

Pretraining comes from this config; the post-training stages from their own job configs (`sft_config`,
`grpo_config`), each starting from the previous stage's model, on this config's task split and storage, as
`<storage.name>-sft` and `<storage.name>-grpo`. Every stage config is validated before anything runs.
Later stages (registry, serving) join here as they land.
"""

from __future__ import annotations

from pydantic import Field, PrivateAttr, model_validator

from jobs.pretrain import PretrainConfig
from rayloop.config import ConfigError, GenerateSection, load_config, run_cli


class PipelineConfig(PretrainConfig):
    """Pretrain, SFT, GRPO; score vLLM generations on the held-out eval set after each."""

    job_name = "pipeline"
    generate: GenerateSection = GenerateSection()
    num_samples: int = Field(default=5, ge=0)
    """Eval prompts printed with their completions at the end."""
    sft_config: str | None = None
    """Config of the SFT stage (jobs.sft); unset: no SFT."""
    grpo_config: str | None = None
    """Config of the GRPO stage (jobs.grpo); unset: no GRPO."""
    _stages: list = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _load_stages(self):
        from jobs.grpo import GRPOJobConfig
        from jobs.sft import SFTJobConfig

        self._stages = []
        for field, cls, suffix in (("sft_config", SFTJobConfig, "sft"), ("grpo_config", GRPOJobConfig, "grpo")):
            path = getattr(self, field)
            if path is None:
                continue
            try:
                stage = load_config(cls, ["--config", path], context={"model_from_previous_stage": True})
            except ConfigError as exc:
                raise ValueError(f"{field}: {exc}") from None
            # One task split for every stage, or the held-out problems would leak into training.
            stage.task = self.task
            stage.ray = self.ray
            stage.registry = self.registry
            stage.storage = self.storage.model_copy(update={"name": f"{self.storage.name}-{suffix}"})
            self._stages.append((suffix, stage))
        return self


def main(cfg: PipelineConfig) -> dict:
    from jobs import grpo, pretrain, sft
    from rayloop import storage
    from rayloop.generate import generate_on_ray
    from rayloop.tasks import ArithmeticTask, accuracy

    examples = ArithmeticTask(cfg.task).eval_examples()
    answers = [e["answer"] for e in examples]

    def vllm_accuracy(model_dir: str) -> tuple[float, list[str]]:
        outputs = generate_on_ray(model_dir, [e["prompt"] for e in examples], cfg.generate,
                                  use_gpu=cfg.scaling.use_gpu)
        completions = [out["text"] for out in outputs]
        return accuracy(completions, answers), completions

    summary = pretrain.main(cfg)
    model_dir = summary["model_dir"]
    summary["eval_accuracy"], completions = vllm_accuracy(model_dir)
    table = [("pretrain", summary["eval_accuracy"])]
    for name, stage in cfg._stages:
        stage.model.name_or_path = model_dir
        stage_summary = {"sft": sft, "grpo": grpo}[name].main(stage)
        model_dir = stage_summary["model_dir"]
        acc, completions = vllm_accuracy(model_dir)
        summary[f"{name}_eval_accuracy"] = acc
        summary[f"{name}_exact_match"] = stage_summary.get("exact_match")  # on the task's data only
        table.append((name, acc))
    summary["model_dir"] = model_dir
    for example, completion in list(zip(examples, completions))[: cfg.num_samples]:
        print(f"  {example['prompt']}{completion!r:<12} expected {example['answer']}")
    print(f"pipeline: vLLM exact-match accuracy on {len(examples)} held-out problems: "
          + ", ".join(f"after {name} {acc:.1%}" for name, acc in table))
    storage.write_json(cfg.storage.run_path("results.json"), summary)  # pretraining's figures and every stage's
    return summary


if __name__ == "__main__":
    from jobs import pipeline

    run_cli(pipeline.PipelineConfig, pipeline.main)
