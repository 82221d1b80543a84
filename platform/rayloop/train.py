"""Ray Train + DeepSpeed glue shared by every training job.

Driver side: `make_trainer` turns the shared config sections into a `TorchTrainer` (ScalingConfig, RunConfig with
FailureConfig and CheckpointConfig). Worker side: `deepspeed_config` writes DeepSpeed's own config dict from the
sections (anything else passes through `deepspeed.overrides`), `shard_blocks` gives each worker its slice of the
data, `save_checkpoint` hands `ray.train.report` an HF folder (ZeRO-3 weights gathered) plus the DeepSpeed state for
exact resume, and `restore_checkpoint` loads it back.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from rayloop.config import DeepSpeedSection, OptimSection, ScalingSection, StorageSection
from rayloop.console import say


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _merge_overrides(config: dict, overrides: dict) -> dict:
    """`config` with `deepspeed.overrides` merged in, dropping the AdamW keys of ours that another optimizer would
    refuse: `fused` once an override turns `torch_adam` off (DeepSpeed's own Adams, CPUAdam included, take no such
    argument) or names Muon (whose auxiliary Adam takes `torch_adam` but not `fused`), both once it names any other
    optimizer type."""
    merged = _merge(config, overrides)
    optimizer = merged.get("optimizer", {})
    params = dict(optimizer.get("params", {}))
    kind = str(optimizer.get("type", "")).lower()  # DeepSpeed lower-cases the type too
    if kind not in ("adam", "adamw", "muon"):
        params.pop("torch_adam", None)
    if not params.get("torch_adam") or kind == "muon":
        params.pop("fused", None)
    if optimizer:
        merged["optimizer"] = {**optimizer, "params": params}
    return merged


def restore_adamw_kernel(optimizer) -> None:
    """Step the Adam kernel the optimizer was built with (this run's config) after a checkpoint was loaded into it:
    torch's `load_state_dict` replaces every param group with the saved one, `fused` and `foreach` included, so a
    resumed run would otherwise step the kernel of the run that wrote the checkpoint. `optimizer` may be the wrapper
    DeepSpeed or accelerate hand out; the torch optimizer inside is found through `.optimizer`."""
    import torch

    seen = set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
            for group in optimizer.param_groups:
                group["fused"] = optimizer.defaults.get("fused")
                group["foreach"] = optimizer.defaults.get("foreach")
            return
        optimizer = getattr(optimizer, "optimizer", None)


def zero_section(ds: DeepSpeedSection, use_gpu: bool, hidden_size: int | None = None) -> dict[str, Any]:
    """DeepSpeed's `zero_optimization`. With the model's `hidden_size`, its buffers are sized to the model as the HF
    Trainer's `auto` sizes them: DeepSpeed's own defaults are element counts for billion-parameter models (a
    5e8-element gradient bucket, 2 GB in fp32, allocated whole when a ZeRO-3 engine is built, whatever the model)."""
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if hidden_size and ds.zero_stage >= 2:
        zero["reduce_bucket_size"] = hidden_size * hidden_size
    if hidden_size and ds.zero_stage == 3:
        zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden_size * hidden_size)
        zero["stage3_param_persistence_threshold"] = 10 * hidden_size
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": use_gpu}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": use_gpu}
    if ds.zero_stage == 3:
        # The HF Trainer's save_model (TRL jobs) writes an ordinary HF folder under ZeRO-3 only with this set: it
        # then gathers module by module through DeepSpeed. Pretraining's own save gathers in `gathered_state_dict`.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return zero


def zero_optimization(ds: DeepSpeedSection, use_gpu: bool, hidden_size: int | None = None) -> dict[str, Any]:
    """`zero_section` with `deepspeed.overrides` merged in: the `zero_optimization` DeepSpeed will get."""
    return _merge_overrides({"zero_optimization": zero_section(ds, use_gpu, hidden_size)},
                            ds.overrides)["zero_optimization"]


def torch_adamw_params(use_gpu: bool) -> dict[str, Any]:
    """DeepSpeed `optimizer.params` keys choosing the AdamW implementation: DeepSpeed's FusedAdam on GPUs; on CPUs,
    torch's AdamW (FusedAdam needs CUDA; DeepSpeed's CPUAdam compiles an extension on first use, and an override of
    `torch_adam: false` picks it).

    torch's fused CPU kernel (`deepspeed.overrides={"optimizer": {"params": {"fused": true}}}`) stepped the 25.5M
    `small` preset on one thread in ~65 ms against ~200 ms for torch's default per-tensor loop, ~6% of a two-worker
    ZeRO-2 step (bench/pretrain.py). It is not the default because the demo's tiny SFT lands on either side of a
    late, steep jump in held-out exact match depending on rounding: with the fused kernel the same pipeline reached
    9.8% after SFT, against 98.6% with the default kernel."""
    return {"torch_adam": not use_gpu}


def hf_deepspeed_config(ds: DeepSpeedSection, *, use_gpu: bool, precision: str) -> dict[str, Any]:
    """The same DeepSpeed settings for a transformers/TRL Trainer: sizes, LR and bf16 mode left `auto`, so the
    Trainer fills them from its arguments (it rejects a DeepSpeed config that disagrees with them); `precision`
    adds DeepSpeed's autocast on a CPU (rayloop/precision.py)."""
    from rayloop.precision import deepspeed_precision

    # bf16 (DeepSpeed's bf16 mode) is the Trainer's to fill from its `bf16` argument; autocast is ours.
    autocast = {k: v for k, v in deepspeed_precision(precision, use_gpu).items() if k != "bf16"}
    config = {
        **autocast,
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": zero_section(ds, use_gpu),
        "bf16": {"enabled": "auto"},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": "auto", "weight_decay": "auto", "betas": "auto", "eps": "auto",
                       **torch_adamw_params(use_gpu)},
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return _merge_overrides(config, ds.overrides)


def deepspeed_config(ds: DeepSpeedSection, optim: OptimSection, *, micro_batch_size: int, grad_accum: int,
                     world_size: int, total_steps: int, use_gpu: bool, precision: str,
                     hidden_size: int | None = None) -> dict[str, Any]:
    """DeepSpeed's config dict, in DeepSpeed's own keys: ZeRO (its buffers sized by the model's `hidden_size`),
    offload, `precision` (`bf16`/`fp32`, as `rayloop.precision.agreed` chose it), AdamW, warm-up + cosine LR."""
    from rayloop.precision import deepspeed_precision

    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero_section(ds, use_gpu, hidden_size),
        **deepspeed_precision(precision, use_gpu),
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": optim.lr, "weight_decay": optim.weight_decay, **torch_adamw_params(use_gpu)},
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": max(total_steps, optim.warmup_steps + 1),
                "warmup_num_steps": optim.warmup_steps,
                "warmup_min_ratio": 0.0,
                "cos_min_ratio": 0.1,
            },
        } if optim.schedule == "cosine" else {
            "type": "WarmupLR",
            # DeepSpeed's WarmupLR refuses 0 warm-up steps.
            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": optim.lr,
                       "warmup_num_steps": max(optim.warmup_steps, 1), "warmup_type": "linear"},
        },
        "steps_per_print": 10**9,  # progress goes to the bar and TensorBoard, not DeepSpeed's log lines
        "wall_clock_breakdown": False,
    }
    return _merge_overrides(config, ds.overrides)


def worker_nodes() -> list[str]:
    """The Ray node id of every worker, in rank order (every rank must call this)."""
    import ray
    import torch.distributed as dist

    nodes: list = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    return nodes


def shard_blocks(blocks, rank: int, world_size: int):
    """This worker's rows of a [n, block] tensor: every world_size-th row, the same count on every worker."""
    usable = (len(blocks) // world_size) * world_size
    if usable == 0:
        raise ValueError(f"{len(blocks)} blocks of data cannot feed {world_size} workers")
    return blocks[rank:usable:world_size]


def resume_notice(run_dir: str) -> str | None:
    """A line for a run folder that already holds checkpoints: Ray Train restores a run by name, so rerunning a job
    under the same storage.name continues that run (from its newest checkpoint), even after a config change."""
    from rayloop import storage

    if not storage.is_file(storage.join(run_dir, "checkpoint_manager_snapshot.json")):
        return None
    name = run_dir.rstrip("/").rsplit("/", 1)[-1]
    return (f"{name}: continuing the existing run at {run_dir} from its newest checkpoint "
            f"(Ray Train restores runs by name; --storage.name=<new name> starts afresh)")


def make_trainer(train_loop: Callable[[dict], None], loop_config: dict, *, scaling: ScalingSection,
                 storage: StorageSection, max_failures: int = 0, num_to_keep: int | None = None,
                 datasets: dict | None = None, read_ahead_bytes: int | None = None):
    """A TorchTrainer for `train_loop(loop_config)` on `scaling`, storing runs under `storage`. `datasets` (Ray Data)
    reach every worker whole and in a fixed order (`get_dataset_shard`), each worker taking its own share (see
    rayloop.data.BlockStream), and each worker's stream fills at most `read_ahead_bytes` of the object store."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Ray Train moves each worker into a scratch folder of its own unless told not to (read by `fit()` in this
    # process). Left in the job's working dir, workers resolve a relative `dataset.path` and import a reward module
    # exactly as the driver does, the way a `ray job submit --working-dir` user expects.
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    # Ray Train replaces `print` in its workers with one that logs every line, also lines printed while a library
    # has swapped sys.stdout for a buffer to capture them (ray-project/ray#61050). dill does that to find a
    # function's globals: it disassembles the function into a buffer. TRL's trainers map their datasets, datasets
    # hashes each map's function with dill, and so each post-training worker would log hundreds of lines of bytecode
    # per map. Unpatched, a worker's prints go to its stdout, which Ray sends to the driver and the job's log; what
    # is given up is their copy in Ray Train's structured worker log (ray-train-app-worker-*.log), which rayloop
    # does not read. Ray Train passes this variable from the driver to its workers; a user who sets it keeps it.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    run_dir = storage.run_dir()
    storage_path, name = run_dir.rsplit("/", 1)
    notice = resume_notice(run_dir)
    if notice:
        say(notice)
    data = {}
    if datasets:
        ingest = DataConfig.default_ingest_options()
        ingest.preserve_order = True
        if read_ahead_bytes is not None:
            ingest.resource_limits = ingest.resource_limits.copy(object_store_memory=float(read_ahead_bytes))
        data = {"datasets": datasets, "dataset_config": DataConfig(datasets_to_split=[], execution_options=ingest)}
    return TorchTrainer(
        train_loop_per_worker=train_loop,
        train_loop_config=loop_config,
        **data,
        scaling_config=ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker={"CPU": scaling.cpus_per_worker},
            placement_strategy=scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep),
        ),
    )


def final_checkpoint(result, storage_section: StorageSection, plot: str | None = None) -> str:
    """Where the run's final checkpoint lives, as a local path or a URI with its scheme (Ray Train's
    `Checkpoint.path` drops the scheme of remote storage); the run's PNG curve `plot` is copied beside it."""
    from rayloop import storage

    if result.checkpoint is None:
        raise RuntimeError(f"{storage_section.name}: the run reported no checkpoint")
    checkpoint = storage_section.run_path(result.checkpoint.path.rstrip("/").rsplit("/", 1)[-1])
    if plot is not None and storage.is_file(png := storage_section.run_path("tensorboard", plot)):
        storage.copy(png, storage.join(checkpoint, plot))
    return checkpoint


def gathered_state_dict(engine) -> dict | None:
    """Full state dict of a DeepSpeed engine on rank 0 (None elsewhere), on the host.

    Under ZeRO-3 the parameters are gathered one at a time: rank 0 keeps each as a host copy, the other ranks free
    it before the next, so they never hold more than their partition and one whole parameter (DeepSpeed's own
    `GatheredParameters` over all parameters at once would put the whole model on every rank).
    """
    import deepspeed
    import torch.distributed as dist

    module, writer = engine.module, dist.get_rank() == 0
    if not engine.zero_optimization_partition_weights():
        return {k: v.detach().cpu() for k, v in module.state_dict().items()} if writer else None
    # Parameters the last forward prefetched and never used (an eval's, for one) are still in flight: waited for
    # and released first, as a gather of one would otherwise fail to partition it again.
    engine.empty_partition_cache()
    # Buffers are whole on every rank; partitioned parameters appear here as empty placeholders.
    state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()} if writer else None
    names: dict = {}  # parameter -> every name it has (tied weights have two)
    for name, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(param, []).append(name)
    for param, param_names in names.items():  # the same order on every rank: the gathers are collective
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if writer:
                value = param.detach().cpu().clone()
                for name in param_names:
                    state[name] = value
    return state


def load_partitioned(path: str, ds_config: dict[str, Any], dtype):
    """Model and tokenizer from an HF folder for a ZeRO-3 engine: the model is built under `deepspeed.zero.Init`, so
    each rank allocates only its partition, then rank 0 reads the weights from the folder's safetensors one
    parameter at a time into that parameter gathered, and DeepSpeed partitions it again. No rank holds the whole
    model and only rank 0 reads it.

    transformers' own ZeRO-3 loading (`from_pretrained` while an `HfDeepSpeedConfig` is alive) reads the whole state
    dict on every rank before copying it in (transformers 5.x `_load_state_dict_into_zero3_model`); there is no
    public API that streams a checkpoint into partitioned parameters."""
    import deepspeed
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights

    from rayloop.models import SafetensorsFolder
    from rayloop.storage import local_copy, training_state

    folder = local_copy(str(path), exclude=training_state)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    deepspeed.init_distributed()  # over Ray Train's process group
    # Random initialisation would write into the empty partitions (and is overwritten below anyway): skipped, as
    # transformers' own ZeRO-3 loading skips it. The partitions' dtype comes from the config (bf16 mode or fp32):
    # DeepSpeed 0.19's zero.Init turns an explicit `dtype` into bf16 on an accelerator without fp16, a CPU.
    with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, local_files_only=True),
                                                 dtype=dtype)
    model.tie_weights()  # from_pretrained ties after loading; from_config under zero.Init leaves it to the caller
    weights = SafetensorsFolder(folder)  # read tensor by tensor, never mapped whole
    # Checked on every rank before any collective, so a bad folder fails everywhere instead of hanging the others.
    if missing := [name for name, _ in model.named_parameters() if name not in weights]:
        raise ValueError(f"{path}: the safetensors weights lack {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    writer = dist.get_rank() == 0
    for name, param in model.named_parameters():  # the same order on every rank: the gathers are collective
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if writer:
                param.data.copy_(weights.get_tensor(name))
    for name, buffer in model.named_buffers():  # whole on every rank: each reads its own
        if name in weights:
            buffer.data.copy_(weights.get_tensor(name))
    return model, tokenizer


def save_checkpoint(engine, tokenizer, metrics: dict[str, Any], state: dict[str, Any], *,
                    delay_s: float = 0.0) -> None:
    """One Ray Train checkpoint from every rank: `hf/` (gathered weights, rank 0), `deepspeed/` (each rank's
    engine, optimizer and scheduler shards) and `trainer_state.json` (step, data position, metric history).

    Every rank must call this. Ray Train merges the ranks' directories in storage and registers the checkpoint only
    once all have reported, so a worker that dies half-way leaves the previous checkpoint the latest one.
    `delay_s` (tests only) holds ranks other than 0 back before they report, to kill one mid-checkpoint.
    """
    import ray.train
    import torch.distributed as dist

    state_dict = gathered_state_dict(engine)
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(os.path.join(tmp, "deepspeed"), tag="state")
        if dist.get_rank() == 0:
            hf_dir = os.path.join(tmp, "hf")
            engine.module.save_pretrained(hf_dir, state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(hf_dir)
            with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                json.dump(state, f)
        elif delay_s:
            time.sleep(delay_s)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def checkpoint_state() -> dict[str, Any] | None:
    """The trainer state of the latest Ray Train checkpoint (read alone, not the whole checkpoint), or None."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.filesystem.open_input_stream(f"{checkpoint.path}/trainer_state.json") as f:
        return json.loads(f.read())


def restore_checkpoint(engine) -> dict[str, Any] | None:
    """Load the latest Ray Train checkpoint into the engine (exact resume) and return its trainer state."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        engine.load_checkpoint(os.path.join(folder, "deepspeed"), tag="state")
        restore_adamw_kernel(engine.optimizer)  # where an override chose the fused kernel
        with open(os.path.join(folder, "trainer_state.json")) as f:
            return json.load(f)
