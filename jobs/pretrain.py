"""Pretrain a causal LM with DeepSpeed ZeRO inside Ray Train workers.

    python -m jobs.pretrain --config jobs/configs/pretrain_tiny.yaml
    ray job submit --working-dir . -- python -m jobs.pretrain --config jobs/configs/pretrain_tiny.yaml

The driver validates the config, puts the starting model folder in the run's storage (a preset it builds, or the
HF folder given), and hands `train_loop` to a TorchTrainer. Each worker loads the folder from storage, wraps it in
a DeepSpeed engine, trains on its shard of the packed corpus, and the final weights come back as an HF folder in a
Ray Train checkpoint, in storage beside the run's TensorBoard logs, curve and results.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time

from pydantic import Field, model_validator

from rayloop.config import (DataSection, DeepSpeedSection, JobConfig, ModelSection, OptimSection, ScalingSection,
                            Section, TaskSection, run_cli)
from rayloop.console import say
from rayloop.data import BlockStream


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
    """Log training metrics (TensorBoard, Ray Train) every this many steps."""
    checkpoint_every: int = Field(default=100, ge=1)
    """Eval loss and perplexity, then a checkpoint, every this many steps (and always at the last step)."""
    keep_checkpoints: int | None = Field(default=3, ge=1)
    """Checkpoints kept in storage, newest first (None: all)."""
    max_failures: int = Field(default=1, ge=-1)
    """Worker-group restarts from the latest checkpoint before the run fails (-1: unlimited)."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in the backward pass instead of keeping them: activation memory of one
    layer plus each layer's input, for about a third more compute. For long sequences or large models."""
    fault_delay_checkpoint_step: int | None = None
    """Test hook: at this step of a run's first attempt, ranks other than 0 wait 30 s before reporting their
    checkpoint, so a test can kill a worker in the middle of a checkpoint."""


class PretrainConfig(JobConfig):
    """Pretrain a causal LM with DeepSpeed ZeRO on Ray Train."""

    job_name = "pretrain"
    model: ModelSection = ModelSection()
    task: TaskSection = TaskSection()
    data: DataSection = DataSection()
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
        return self

    @property
    def micro_batch_size(self) -> int:
        return self.train.global_batch_size // (self.scaling.num_workers * self.train.grad_accum)

    def memory_workload(self):
        """What each worker will hold, for the memory plan (rayloop/plan.py)."""
        from rayloop.plan import model_shape, workload

        return workload(self, model_shape(self.model.name_or_path, self.model.vocab_size),
                        tokens=self.micro_batch_size * self.train.seq_len,
                        gradient_checkpointing=self.train.gradient_checkpointing)


def _mean_over_workers(value: float, device) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device=device)  # NCCL reduces only GPU tensors
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
    return _mean_over_workers(sum(losses) / len(losses), engine.device)


def batch_at(blocks, position: int, micro: int, seed: int):
    """The micro batch at `position` (in micro batches) of an endless, per-epoch reshuffled pass over `blocks`.

    A pure function of the position: resuming at a step needs no saved sampler state.
    """
    per_epoch = len(blocks) // micro
    if per_epoch == 0:
        raise ValueError(f"{len(blocks)} blocks per worker cannot fill a micro batch of {micro}")
    epoch, index = divmod(position, per_epoch)
    order = _epoch_order(len(blocks), seed, epoch)
    return blocks[order[index * micro: (index + 1) * micro]]


@functools.lru_cache(maxsize=2)
def _epoch_order(num_blocks: int, seed: int, epoch: int):
    """One epoch's shuffle, drawn once per epoch rather than once per micro batch (O(blocks) each time)."""
    import torch

    return torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def train_loop(loop_config: dict) -> None:
    import deepspeed
    import ray.train
    import torch

    from rayloop import storage
    from rayloop.console import reporter
    from rayloop.memory import PhasePeaks, peaks_of_all_workers
    from rayloop.models import hidden_size, load_model
    from rayloop.precision import BF16, agreed, describe, logits_in_fp32
    from rayloop.tracking import Tracker, log_dir_for, plot_curves, sync_logs
    from rayloop.train import (checkpoint_state, deepspeed_config, load_partitioned, restore_checkpoint,
                               save_checkpoint, worker_nodes)

    cfg: PretrainConfig = loop_config["cfg"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run_dir = cfg.storage.run_dir()
    log_dir = log_dir_for(run_dir)

    progress = reporter(loop_config, rank, cfg.train.steps)
    peaks = PhasePeaks()
    resumed = checkpoint_state() if cfg.scaling.use_gpu else None
    if resumed and "precision" in resumed:
        # On a GPU the optimizer state on disk has its precision's layout (DeepSpeed's bf16 mode keeps an fp32
        # master copy that fp32 mode lacks). On a CPU both keep fp32 weights, so each resumed group decides anew.
        precision, why = resumed["precision"], "the precision of the run's checkpoints"
    else:
        precision, why = agreed(cfg.deepspeed.precision, cfg.scaling.use_gpu)
    progress.say(f"pretrain: {describe(precision, why, autocast=not cfg.scaling.use_gpu)}")

    # In the weights' dtype of the chosen precision, whatever the folder holds (a bf16 model from a GPU run or the
    # Hub): DeepSpeed's fp32 and autocast modes train the weights they are given; its bf16 mode would cast fp32
    # weights to bf16 on the host anyway, so loading them in bf16 saves half the host memory.
    weights_dtype = torch.bfloat16 if precision == BF16 and cfg.scaling.use_gpu else torch.float32
    ds_config = deepspeed_config(cfg.deepspeed, cfg.optim, micro_batch_size=cfg.micro_batch_size,
                                 grad_accum=cfg.train.grad_accum, world_size=world, total_steps=cfg.train.steps,
                                 use_gpu=cfg.scaling.use_gpu, precision=precision,
                                 hidden_size=hidden_size(loop_config["model_dir"]))
    with peaks.phase("build"):
        if cfg.deepspeed.zero_stage == 3:  # built partitioned: no rank ever holds the whole model
            model, tokenizer = load_partitioned(loop_config["model_dir"], ds_config, weights_dtype)
        else:
            model, tokenizer = load_model(loop_config["model_dir"], dtype=weights_dtype)
    if cfg.train.gradient_checkpointing:
        # Non-reentrant: the form that works with ZeRO-3's partitioned parameters and inputs that need no grad.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if precision == BF16 and not cfg.scaling.use_gpu:
        logits_in_fp32(model)
    with peaks.phase("engine"):
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=ds_config,
        )
    micro, accum = cfg.micro_batch_size, cfg.train.grad_accum
    with peaks.phase("data"):
        eval_blocks, train_blocks = _data(cfg, tokenizer, rank, world)
    with peaks.phase("resume") if ray.train.get_checkpoint() else contextlib.nullcontext():
        state = restore_checkpoint(engine)
    if state is None:
        state = {"step": 0, "history": {}, "resumed_from_step": 0,
                 "eval_loss_before": evaluate(engine, eval_blocks, micro)}
    start_step = state["step"]
    if start_step:
        state["resumed_from_step"] = start_step
    state["worker_nodes"] = worker_nodes()  # this attempt's, reported with each checkpoint
    state["precision"] = precision
    batches = _micro_batches(cfg, train_blocks, rank, world, start_step, state.get("data_position"))
    tracker = Tracker(log_dir, initial_step=start_step, history=state["history"], enabled=rank == 0,
                      progress=progress)

    tokens, started = 0, time.perf_counter()
    for step in range(start_step + 1, cfg.train.steps + 1):
        with peaks.phase("first_step") if step == start_step + 1 else contextlib.nullcontext():
            for k in range(accum):
                batch = next(batches).to(engine.device)
                loss = engine(input_ids=batch, labels=batch).loss
                engine.backward(loss)
                engine.step()
                tokens += batch.numel() * world
        tracker.advance()
        metrics = {"step": step}
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            # The only host sync of the loss: on a GPU, an .item() every step would stall the pipeline.
            metrics |= {"loss": _mean_over_workers(loss.item(), engine.device), "lr": engine.get_lr()[0],
                        "tokens_per_s": tokens / (time.perf_counter() - started)}
            # DeepSpeed keeps the norm only where a ZeRO optimizer computes it.
            if (grad_norm := engine.get_global_grad_norm()) is not None:
                metrics["grad_norm"] = float(grad_norm)
        if step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps:
            eval_loss = evaluate(engine, eval_blocks, micro)
            metrics |= {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50))}
        if len(metrics) == 1:
            continue
        tracker.log(step, {k: v for k, v in metrics.items() if k != "step"})
        if "eval_loss" not in metrics:
            ray.train.report(metrics)
            continue
        state.update(step=step, history=tracker.history)
        if isinstance(batches, BlockStream):
            state["data_position"] = batches.position
        first_attempt = state["resumed_from_step"] == 0
        delay = 30.0 if first_attempt and step == cfg.train.fault_delay_checkpoint_step else 0.0
        summary = {k: state[k] for k in ("eval_loss_before", "resumed_from_step", "worker_nodes", "precision")}
        if step == cfg.train.steps and rank == 0:
            plot_curves(tracker.history, ["loss", "eval_loss"], f"{log_dir}/loss.png",
                        title=f"pretrain {cfg.storage.name}")
        with peaks.phase("save"):
            save_checkpoint(engine, tokenizer, metrics | summary, state, delay_s=delay)
        if rank == 0:  # after the checkpoint is registered: a resumed run logs again only what it redoes
            tracker.flush()
            sync_logs(log_dir, run_dir)
    tracker.close()
    sync_logs(log_dir, run_dir, last=True, upload=rank == 0)
    peaks.close()
    # Beside the run's results rather than in a report: Ray Train's result keeps the last checkpoint's metrics, and
    # the last save's own peak is known only after it.
    peak_bytes = peaks_of_all_workers(peaks)
    if rank == 0:
        storage.write_json(cfg.storage.run_path("memory_peaks.json"), peak_bytes)


def _data(cfg: PretrainConfig, tokenizer, rank: int, world: int):
    """(this worker's held-out blocks, its training blocks or None where they stream from Ray Data)."""
    import ray.train

    from rayloop.data import head_blocks, load_documents, pack_blocks
    from rayloop.train import shard_blocks

    if cfg.data.loader == "ray_data":
        return head_blocks(ray.train.get_dataset_shard("eval"), rank=rank, world=world,
                           most=cfg.data.eval_blocks), None
    train_docs, eval_docs = load_documents(cfg.data, cfg.task)
    train_blocks = shard_blocks(pack_blocks(train_docs, tokenizer, cfg.train.seq_len), rank, world)
    return shard_blocks(pack_blocks(eval_docs, tokenizer, cfg.train.seq_len), rank, world)[:cfg.data.eval_blocks], \
        train_blocks


def _micro_batches(cfg: PretrainConfig, train_blocks, rank: int, world: int, start_step: int,
                   position: dict | None):
    """This worker's micro batches from the step after `start_step` on: streamed from Ray Data (resumed at the saved
    `position`), or drawn from the blocks in memory by their position alone."""
    import itertools

    import ray.train

    micro, accum = cfg.micro_batch_size, cfg.train.grad_accum
    if cfg.data.loader == "ray_data":
        shuffle_blocks = int(cfg.data.shuffle_buffer_bytes) // (8 * cfg.train.seq_len)
        if position is None and start_step:  # a checkpoint that saved no stream position: counted in steps
            position = {"epoch": 0, "batch": start_step * accum}
        return BlockStream(ray.train.get_dataset_shard("train"), rank=rank, world=world, micro=micro,
                           seed=cfg.data.seed, shuffle_blocks=shuffle_blocks, position=position)
    return (batch_at(train_blocks, p, micro, cfg.data.seed) for p in itertools.count(start_step * accum))


TOKENIZER_DOCUMENTS = 100_000
"""Documents a preset's tokenizer is trained on: the corpus's first ones, however large the corpus."""


def prepare_model(cfg: PretrainConfig) -> str:
    """The starting HF folder: the one configured, or a preset built once per run into the run's storage (its
    tokenizer trained on the training documents), where every worker node can read it."""
    import tempfile

    from rayloop import storage
    from rayloop.data import load_documents
    from rayloop.models import PRESETS, create_model_folder

    if cfg.model.name_or_path not in PRESETS:
        return cfg.model.name_or_path
    folder = cfg.storage.run_path("base_model")
    if storage.is_file(storage.join(folder, "config.json")):
        return folder
    if cfg.data.loader == "ray_data":
        from rayloop.data import document_datasets

        documents = [row["text"] for row in document_datasets(cfg.data, cfg.task)[0].take(TOKENIZER_DOCUMENTS)]
    else:
        documents = load_documents(cfg.data, cfg.task)[0][:TOKENIZER_DOCUMENTS]
    if not storage.is_uri(folder):
        create_model_folder(cfg.model.name_or_path, documents, folder, vocab_size=cfg.model.vocab_size,
                            seed=cfg.model.seed)
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        local = create_model_folder(cfg.model.name_or_path, documents, f"{tmp}/base_model",
                                    vocab_size=cfg.model.vocab_size, seed=cfg.model.seed)
        # config.json last: its presence is what says that the folder is complete.
        for file in sorted(local.iterdir(), key=lambda f: f.name == "config.json"):
            storage.upload(file, storage.join(folder, file.name))
    return folder


def main(cfg: PretrainConfig) -> dict:
    """Train (or resume the run of the same name); return the final metrics and the final HF folder's path."""
    from rayloop import storage
    from rayloop.cluster import init_ray
    from rayloop.console import stage_bar
    from rayloop.models import PRESETS
    from rayloop.registry import register
    from rayloop.train import final_checkpoint, make_trainer

    init_ray(cfg.ray)
    model_dir = prepare_model(cfg)
    datasets = None
    if cfg.data.loader == "ray_data":
        from rayloop.data import document_datasets, packed

        train, held_out = document_datasets(cfg.data, cfg.task)
        datasets = {"train": packed(train, model_dir, cfg.train.seq_len),
                    "eval": packed(held_out, model_dir, cfg.train.seq_len)}
    with stage_bar(f"pretrain {cfg.storage.name}", cfg.train.steps) as progress:
        trainer = make_trainer(train_loop, {"cfg": cfg, "model_dir": model_dir, "progress": progress},
                               scaling=cfg.scaling, storage=cfg.storage, max_failures=cfg.train.max_failures,
                               num_to_keep=cfg.train.keep_checkpoints, datasets=datasets,
                               read_ahead_bytes=int(cfg.data.read_ahead_bytes))
        result = trainer.fit()
    checkpoint = final_checkpoint(result, cfg.storage, plot="loss.png")
    summary = {**result.metrics, "checkpoint": checkpoint, "model_dir": storage.join(checkpoint, "hf"),
               "memory_peak_bytes": json.loads(storage.read_text(cfg.storage.run_path("memory_peaks.json")))}
    resumed = f" (resumed at step {summary['resumed_from_step']})" if summary["resumed_from_step"] else ""
    say(f"pretrain: step {summary['step']}{resumed}, eval loss {summary['eval_loss_before']:.3f} -> "
        f"{summary['eval_loss']:.3f}, {summary['tokens_per_s']:.0f} tokens/s in {summary['precision']}, "
        f"model at {summary['model_dir']}")
    say("pretrain: peak host memory per worker (GiB, by rank): " + ", ".join(
        f"{phase} " + "/".join(f"{b / 2**30:.2f}" for b in per_rank)
        for phase, per_rank in summary["memory_peak_bytes"].items() if not phase.endswith("_entry")))
    base = cfg.model.name_or_path
    summary["model_version"] = register(cfg, summary, job="pretrain",
                                        parent=f"preset:{base}" if base in PRESETS else base)
    storage.write_json(cfg.storage.run_path("results.json"), summary)
    return summary


if __name__ == "__main__":
    # Import under the package name so Ray workers unpickle jobs.pretrain.train_loop by reference.
    from jobs import pretrain

    run_cli(pretrain.PretrainConfig, pretrain.main)
