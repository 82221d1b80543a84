"""The whole loop on one config; today: pretrain, then generate with vLLM from the result and score it.

    python -m jobs.pipeline --config jobs/configs/pipeline_tiny.yaml

Later stages (SFT, GRPO, registry, serving) join here as they land.
"""

from __future__ import annotations

from pydantic import Field

from jobs.pretrain import PretrainConfig
from rayloop.config import GenerateSection, run_cli


class PipelineConfig(PretrainConfig):
    """Pretrain, then score vLLM generations on the held-out eval set."""

    job_name = "pipeline"
    generate: GenerateSection = GenerateSection()
    num_samples: int = Field(default=5, ge=0)
    """Eval prompts printed with their completions."""


def main(cfg: PipelineConfig) -> dict:
    from jobs import pretrain
    from rayloop.generate import generate_on_ray
    from rayloop.tasks import ArithmeticTask, accuracy

    summary = pretrain.main(cfg)
    examples = ArithmeticTask(cfg.task).eval_examples()
    outputs = generate_on_ray(summary["model_dir"], [e["prompt"] for e in examples], cfg.generate,
                              use_gpu=cfg.scaling.use_gpu)
    completions = [out["text"] for out in outputs]
    summary["eval_accuracy"] = accuracy(completions, [e["answer"] for e in examples])
    for example, completion in list(zip(examples, completions))[: cfg.num_samples]:
        print(f"  {example['prompt']}{completion!r:<12} expected {example['answer']}")
    print(f"pipeline: vLLM exact-match accuracy on {len(examples)} held-out problems: {summary['eval_accuracy']:.1%}")
    return summary


if __name__ == "__main__":
    from jobs import pipeline

    run_cli(pipeline.PipelineConfig, pipeline.main)
