"""The loop on one config: pretrain -> SFT -> GRPO -> registry -> a live endpoint, measured through it.

    python -m jobs.pipeline --config jobs/configs/pipeline_tiny.yaml

Pretraining comes from this config; the post-training stages from their own job configs (`sft_config`,
`grpo_config`), each starting from the previous stage's model, on this config's task split, storage and registry,
as `<storage.name>-sft` and `<storage.name>-grpo`. Every stage config is validated before anything runs. Each stage
registers its model (rayloop/registry.py), so the last one's lineage goes back to the base. The last model is then
served as an endpoint (serve/endpoint.py, `rayloop serve up`), the held-out problems are asked through it with the
`openai` client, and `report.md` (with PNG curves, accuracy per stage and the lineage) is written to the run folder.
"""

from __future__ import annotations

import time

from pydantic import Field, PrivateAttr, model_validator

from jobs.pretrain import PretrainConfig
from rayloop.config import ConfigError, GenerateSection, JobError, Section, load_config, run_cli
from rayloop.console import say


class EndpointSection(Section):
    """The local endpoint the final model is promoted to, and the traffic that measures it."""

    enabled: bool = True
    """Serve the final model and measure accuracy through it (false: stop at the registry)."""
    name: str = Field(default="demo", pattern=r"^[A-Za-z0-9_-]+$")
    """Endpoint (Serve application and registry alias) name."""
    port: int = Field(default=8000, ge=1, le=65535)
    """Loopback port of the endpoint."""
    concurrency: int = Field(default=16, ge=1)
    """Requests in flight while measuring."""
    keep_serving: bool = False
    """Keep the endpoint up after the report, until Ctrl-C (the local Ray ends with this process)."""


def config_argv(paths: str | list[str]) -> list[str]:
    """A stage's config file, or files merged in order, as the repeated `--config` arguments load_config takes."""
    return [arg for path in ([paths] if isinstance(paths, str) else paths) for arg in ("--config", path)]


class PipelineConfig(PretrainConfig):
    """Pretrain, SFT, GRPO; register each model; serve the last and measure held-out accuracy through it."""

    job_name = "pipeline"
    generate: GenerateSection = GenerateSection()
    num_samples: int = Field(default=5, ge=0)
    """Eval prompts printed with the endpoint's answers at the end."""
    sft_config: str | list[str] | None = None
    """Config of the SFT stage (jobs.sft): a file, or files merged in order as repeated `--config`s are; unset:
    no SFT."""
    grpo_config: str | list[str] | None = None
    """Config of the GRPO stage (jobs.grpo), as `sft_config`; unset: no GRPO."""
    endpoint: EndpointSection = EndpointSection()
    """The live endpoint at the end of the loop."""
    seed: int | None = None
    """One seed for the whole loop: the model's initialisation (model.seed) and every stage's data order (data.seed,
    each stage's train.seed; for `text` and `hf` data, data.seed also picks pretraining's held-out documents). Unset:
    each keeps its own. The task's split (task.seed) stays apart, so runs of different seeds are measured on the
    same held-out problems."""
    _stages: list = PrivateAttr(default_factory=list)

    @model_validator(mode="after")
    def _load_stages(self):
        from jobs.grpo import GRPOJobConfig
        from jobs.sft import SFTJobConfig

        self._stages = []
        if self.seed is not None:
            self.model.seed = self.data.seed = self.seed
        for field, cls, suffix in (("sft_config", SFTJobConfig, "sft"), ("grpo_config", GRPOJobConfig, "grpo")):
            paths = getattr(self, field)
            if paths is None:
                continue
            if not paths:
                raise ValueError(f"{field}: name at least one config file (or leave it unset: no such stage)")
            argv = config_argv(paths)
            try:
                stage = load_config(cls, argv, context={"model_from_previous_stage": True})
            except ConfigError as exc:
                raise ValueError(f"{field}: {exc}") from None
            # One task split for every stage, or the held-out problems would leak into training.
            stage.task = self.task
            stage.ray = self.ray
            if self.seed is not None:
                stage.train.seed = self.seed
            stage.registry = self.registry
            stage.storage = self.storage.model_copy(update={"name": f"{self.storage.name}-{suffix}"})
            self._stages.append((suffix, stage))
        return self


def serve_and_measure(cfg: PipelineConfig, ref: str, examples: list[dict]) -> dict:
    """Serve `ref` as the endpoint, ask every held-out problem through it with the openai client; its accuracy."""
    import logging
    import os
    import secrets
    from concurrent.futures import ThreadPoolExecutor

    from openai import OpenAI

    from rayloop import registry
    from rayloop.config import validate
    from rayloop.console import bar
    from rayloop.tasks import accuracy
    from serve import endpoint
    from serve.deploy import DeployConfig

    # The endpoint keeps its key check; a key made for this run, unless the user set one.
    if not os.environ.get("RAYLOOP_API_KEY"):
        os.environ["RAYLOOP_API_KEY"] = secrets.token_urlsafe(24)
        os.environ["RAYLOOP_API_KEY_MADE_HERE"] = "1"
    uri = cfg.registry.uri or registry.default_uri(cfg.storage.path)
    version = registry.get_version(registry.client(uri), ref)
    # A thousand requests: their access log lines and the client's would bury the figures.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    deploy = validate(DeployConfig, {"model": version.source, "port": cfg.endpoint.port, "models": [],
                                     "accelerator": "gpu" if cfg.scaling.use_gpu else "cpu", "access_log": False})
    entry = deploy.models[0]
    entry.max_model_len, entry.kv_cache_memory_bytes = cfg.generate.max_model_len, cfg.generate.kv_cache_memory_bytes
    say(f"endpoint {cfg.endpoint.name}: starting {ref} on Ray Serve (vLLM) at 127.0.0.1:{cfg.endpoint.port}")
    up = endpoint.up(deploy, cfg.endpoint.name, ref, uri)
    say(f"endpoint {cfg.endpoint.name}: serving {ref} at {up['base_url']} (alias {up['model']}@{cfg.endpoint.name})")
    client = OpenAI(base_url=up["base_url"], api_key=os.environ["RAYLOOP_API_KEY"], max_retries=3)

    def ask(example):
        response = client.completions.create(model=up["model"], prompt=example["prompt"], temperature=0.0,
                                             max_tokens=cfg.generate.max_tokens)
        return response.choices[0].text, response.system_fingerprint

    with ThreadPoolExecutor(cfg.endpoint.concurrency) as pool, \
            bar(f"endpoint {cfg.endpoint.name}", len(examples), unit="request") as progress:
        answers = []
        for answer in pool.map(ask, examples):
            answers.append(answer)
            progress.update()
    completions = [text for text, _ in answers]
    return {"endpoint_accuracy": accuracy(completions, [e["answer"] for e in examples]),
            "endpoint_versions": sorted({v for _, v in answers}), "base_url": up["base_url"],
            "completions": completions, "registry": uri}


def main(cfg: PipelineConfig) -> dict:
    from jobs import grpo, pretrain, sft
    from rayloop import registry, storage
    from rayloop.console import elapsed
    from rayloop.report import write_report
    from rayloop.tasks import ArithmeticTask

    examples = ArithmeticTask(cfg.task).eval_examples()
    started = time.monotonic()
    summary = pretrain.main(cfg)
    say(f"pipeline: pretrain done in {elapsed(time.monotonic() - started)}\n")
    stages = [("pretrain", cfg.storage.run_dir(), dict(summary))]
    for name, stage in cfg._stages:
        started = time.monotonic()
        stage.model.name_or_path = stages[-1][2]["model_dir"]
        stage_summary = {"sft": sft, "grpo": grpo}[name].main(stage)
        stages.append((name, stage.storage.run_dir(), stage_summary))
        say(f"pipeline: {name} done in {elapsed(time.monotonic() - started)}\n")
    final = stages[-1][2]
    summary.update({f"{name}_summary": s for name, _, s in stages[1:]})
    summary["model_dir"], summary["model_version"] = final["model_dir"], final.get("model_version")

    if cfg.endpoint.enabled and not summary["model_version"]:
        raise JobError(f"the final model {summary['model_dir']} is not in the registry (see the warning above), so "
                       f"no endpoint can follow it; --endpoint.enabled=false stops at the model")
    if cfg.endpoint.enabled:
        measured = serve_and_measure(cfg, summary["model_version"], examples)
        for example, completion in list(zip(examples, measured.pop("completions")))[: cfg.num_samples]:
            say(f"  {example['prompt']}{completion!r:<12} expected {example['answer']}")
        summary.update(measured)
        say(f"pipeline: exact-match accuracy through the endpoint, {len(examples)} held-out problems: "
            f"{measured['endpoint_accuracy']:.1%} (answered by {', '.join(measured['endpoint_versions'])})")
    storage.write_json(cfg.storage.run_path("results.json"), summary)
    summary["report"] = write_report(cfg.storage.run_dir(), stages, summary,
                                     cfg.registry.uri or registry.default_uri(cfg.storage.path))
    say(f"pipeline: report at {summary['report']}")
    if cfg.endpoint.enabled and cfg.endpoint.keep_serving:
        import os
        from pathlib import Path

        key = ("this run's, in ~/.rayloop/demo_api_key" if os.environ.get("RAYLOOP_API_KEY_MADE_HERE")
               else "$RAYLOOP_API_KEY")
        if os.environ.get("RAYLOOP_API_KEY_MADE_HERE"):  # written for its user only, never printed
            path = Path("~/.rayloop/demo_api_key").expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as file:
                file.write(os.environ["RAYLOOP_API_KEY"])
            os.chmod(path, 0o600)
        say(f"pipeline: serving at {summary.get('base_url')} until Ctrl-C (API key: {key})")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return summary


if __name__ == "__main__":
    from jobs import pipeline

    run_cli(pipeline.PipelineConfig, pipeline.main)
