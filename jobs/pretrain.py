"""Pretrain a causal LM with DeepSpeed ZeRO inside Ray Train workers.

    python -m jobs.pretrain --config jobs/configs/pretrain_tiny.yaml
    ray job submit --working-dir . -- python -m jobs.pretrain --config jobs/configs/pretrain_tiny.yaml

The driver validates the config, builds the starting model folder (a preset, or any local HF folder), and hands
`train_loop` to a TorchTrainer. Each worker loads the folder, wraps it in a DeepSpeed engine, trains on its shard of
the packed corpus, and the final weights come back as an HF folder in a Ray Train checkpoint.
"""

from __future__ import annotations

import math
import time

from pydantic import Field, model_validator

from rayloop.config import (DeepSpeedSection, JobConfig, ModelSection, OptimSection, ScalingSection, Section,
                            TaskSection, run_cli)


class TrainSection(Section):
    steps: int = Field(default=60, ge=1)
    """Optimizer steps."""
    global_batch_size: int = Field(default=32, ge=1)
    """Sequences per optimizer step, over all workers: num_workers x grad_accum x micro batch."""
    grad_accum: int = Field(default=1, ge=1)
    """Micro batches accumulated per optimizer step."""
    seq_len: int = Field(default=64, ge=8)
    """Tokens per packed training block."""
    log_every: int = Field(default=10, ge=1)
    """Report training metrics every this many steps."""
    seed: int = 0
    """Data order seed."""


class PretrainConfig(JobConfig):
    """Pretrain a causal LM with DeepSpeed ZeRO on Ray Train."""

    job_name = "pretrain"
    model: ModelSection = ModelSection()
    task: TaskSection = TaskSection()
    scaling: ScalingSection = ScalingSection()
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    optim: OptimSection = OptimSection()
    train: TrainSection = TrainSection()

    @model_validator(mode="after")
    def _batch_divides(self):
        per_step = self.scaling.num_workers * self.train.grad_accum
        if self.train.global_batch_size % per_step:
            raise ValueError(
                f"train.global_batch_size ({self.train.global_batch_size}) must be divisible by "
                f"scaling.num_workers x train.grad_accum ({per_step})"
            )
        if self.deepspeed.offload_param and self.deepspeed.zero_stage != 3:
            raise ValueError("deepspeed.offload_param needs deepspeed.zero_stage 3")
        if self.deepspeed.offload_optimizer and self.deepspeed.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
        return self

    @property
    def micro_batch_size(self) -> int:
        return self.train.global_batch_size // (self.scaling.num_workers * self.train.grad_accum)


def _mean_over_workers(value: float) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def evaluate(engine, blocks, micro_batch_size: int) -> float:
    """Mean token loss of this worker's eval blocks, averaged over workers."""
    import torch

    engine.eval()
    losses = []
    with torch.no_grad():
        for i in range(0, len(blocks), micro_batch_size):
            batch = blocks[i: i + micro_batch_size].to(engine.device)
            losses.append(engine(input_ids=batch, labels=batch).loss.float().item())
    engine.train()
    return _mean_over_workers(sum(losses) / len(losses))


def train_loop(loop_config: dict) -> None:
    import deepspeed
    import ray.train
    import torch

    from rayloop.data import pack_blocks
    from rayloop.models import load_model
    from rayloop.tasks import ArithmeticTask
    from rayloop.train import deepspeed_config, report_hf_checkpoint, shard_blocks

    cfg: PretrainConfig = loop_config["cfg"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    model, tokenizer = load_model(loop_config["model_dir"])
    task = ArithmeticTask(cfg.task)
    train_blocks = shard_blocks(pack_blocks(task.pretrain_corpus(), tokenizer, cfg.train.seq_len), rank, world)
    eval_texts = [p.text for p in task.eval_problems]
    eval_blocks = shard_blocks(pack_blocks(eval_texts, tokenizer, cfg.train.seq_len), rank, world)

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=deepspeed_config(cfg.deepspeed, cfg.optim, micro_batch_size=cfg.micro_batch_size,
                                grad_accum=cfg.train.grad_accum, world_size=world, total_steps=cfg.train.steps,
                                use_gpu=cfg.scaling.use_gpu),
    )
    micro = cfg.micro_batch_size
    eval_before = evaluate(engine, eval_blocks, micro)

    generator = torch.Generator().manual_seed(cfg.train.seed)
    order = torch.randperm(len(train_blocks), generator=generator)
    cursor, tokens, started = 0, 0, time.perf_counter()
    for step in range(1, cfg.train.steps + 1):
        for _ in range(cfg.train.grad_accum):
            if cursor + micro > len(order):  # next epoch, reshuffled
                order, cursor = torch.randperm(len(train_blocks), generator=generator), 0
            batch = train_blocks[order[cursor: cursor + micro]].to(engine.device)
            cursor += micro
            loss = engine(input_ids=batch, labels=batch).loss
            engine.backward(loss)
            engine.step()
            tokens += batch.numel()
        if step % cfg.train.log_every == 0 and step < cfg.train.steps:
            elapsed = time.perf_counter() - started
            ray.train.report({"step": step, "loss": _mean_over_workers(loss.item()),
                              "lr": engine.get_lr()[0], "tokens_per_s": tokens * world / elapsed})

    eval_after = evaluate(engine, eval_blocks, micro)
    elapsed = time.perf_counter() - started
    metrics = {"step": cfg.train.steps, "loss": _mean_over_workers(loss.item()), "eval_loss_before": eval_before,
               "eval_loss": eval_after, "eval_perplexity": math.exp(min(eval_after, 50)),
               "tokens_per_s": tokens * world / elapsed}
    report_hf_checkpoint(engine, tokenizer, metrics)


def prepare_model(cfg: PretrainConfig) -> str:
    """The starting HF folder: a local one as given, or a preset built (once per run) under the run folder."""
    from pathlib import Path

    from rayloop.models import PRESETS, create_model_folder
    from rayloop.tasks import ArithmeticTask

    if cfg.model.name_or_path not in PRESETS:
        return cfg.model.name_or_path
    folder = Path(cfg.storage.run_dir()) / "base_model"
    if not (folder / "config.json").is_file():
        create_model_folder(cfg.model.name_or_path, ArithmeticTask(cfg.task).pretrain_corpus(), folder,
                            vocab_size=cfg.model.vocab_size, seed=cfg.model.seed)
    return str(folder)


def main(cfg: PretrainConfig) -> dict:
    """Train; return the final metrics and the path of the final HF folder."""
    from rayloop.cluster import init_ray
    from rayloop.train import make_trainer

    model_dir = prepare_model(cfg)
    init_ray(cfg.ray)
    trainer = make_trainer(train_loop, {"cfg": cfg, "model_dir": model_dir},
                           scaling=cfg.scaling, storage=cfg.storage)
    result = trainer.fit()
    summary = {**result.metrics, "model_dir": f"{result.checkpoint.path}/hf"}
    print(f"pretrain: eval loss {summary['eval_loss_before']:.3f} -> {summary['eval_loss']:.3f}, "
          f"{summary['tokens_per_s']:.0f} tokens/s, model at {summary['model_dir']}")
    return summary


if __name__ == "__main__":
    # Import under the package name so Ray workers unpickle jobs.pretrain.train_loop by reference.
    from jobs import pretrain

    run_cli(pretrain.PretrainConfig, pretrain.main)
