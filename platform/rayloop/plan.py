"""A memory plan before Ray: what each training worker's device will hold, from the config alone, and whether it fits.

    python -m jobs.sft --config jobs/configs/sft_tiny.yaml --plan

Model states (parameters, gradients, optimizer states, and for ZeRO-3 the largest layer gathered) follow DeepSpeed's
own accounting, that of `estimate_zero2_model_states_mem_needs_all_live` and
`estimate_zero3_model_states_mem_needs_all_live` (AdamW; tests/unit/test_plan.py holds them to it):

    mixed precision (16-bit weights, 32-bit master copy)   fp32 weights (CPU, or GPU with deepspeed.precision=fp32)
    ZeRO-0:  2P params + 6P grads + 12P optimizer           4P + 4P + 8P (no master copy: the optimizer is torch's)
    ZeRO-1:  2P + (2P + 4P/N) + 12P/N                       4P + (4P + 4P/N) + 12P/N
    ZeRO-2:  2P + 6P/N + 12P/N                              4P + 8P/N + 12P/N
    ZeRO-3:  2P/N + 4P/N + 12P/N + 4 x largest layer        4P/N + 4P/N + 12P/N + 4 x largest layer

(P trainable parameters, N workers; DeepSpeed's ZeRO keeps a 32-bit copy of each partition even of fp32 weights.)
Offload moves the optimizer states and 32-bit gradients (and, for ZeRO-3, the parameters) to the node's host memory.
Beside them: the parameters ZeRO-3 keeps gathered at once (`stage3_max_live_parameters`), activations of a micro batch
(with and without gradient checkpointing), the logits, a frozen reference model, a colocated vLLM engine, and the
worker process itself. On CPU workers the device is the host: everything counts against the node's memory.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

GiB = 2**30

CPU_WORKER_BYTES = 600 * 2**20
"""A CPU worker process before its model (Python, torch, Ray, DeepSpeed, transformers imported): bench/memory.py's
"RSS before build" column."""
GPU_RUNTIME_BYTES = 1 * GiB
"""A GPU worker's device memory besides tensors: CUDA context, NCCL buffers and the caching allocator's slack."""
RAY_LOCAL_OVERHEAD_BYTES = 1 * GiB
"""Host memory of a local Ray cluster's own processes (GCS, raylet, dashboard) and the job's driver."""
RAY_MEMORY_THRESHOLD = 0.95
"""Ray's memory monitor kills workers past this share of the node's memory (RAY_memory_usage_threshold)."""
DEEPSPEED_BUCKET_DEFAULTS = {"reduce_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7}
"""DeepSpeed's own sizes (elements) of the buffers a config leaves unset."""


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know of a model, read from its config alone (built on the meta device)."""

    parameters: int
    largest_layer: int
    """Parameters of the largest single module (DeepSpeed's `largest_layer_params`: an embedding, usually)."""
    num_layers: int
    hidden: int
    kv_hidden: int
    intermediate: int
    vocab: int
    linear_shapes: tuple[tuple[str, int, int], ...] = field(repr=False, default=())
    """(name, in, out) of every linear layer but the output head: what a LoRA adapter spans."""

    def lora_parameters(self, r: int, target_modules: str | list[str] = "all-linear") -> int:
        """Parameters of a LoRA adapter of rank `r` on `target_modules` (peft's: `all-linear` or last names)."""
        return sum(r * (i + o) for name, i, o in self.linear_shapes
                   if target_modules == "all-linear" or name in target_modules)


@functools.lru_cache(maxsize=16)
def model_shape(name_or_path: str, vocab_size: int = 512) -> ModelShape:
    """The shape of a preset (its tokenizer's vocabulary rounded up as `build_model` does) or of an HF folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    from rayloop.models import PRESETS, model_config

    if name_or_path in PRESETS:
        config = LlamaConfig(vocab_size=-(-vocab_size // 64) * 64, tie_word_embeddings=True, **PRESETS[name_or_path])
    else:
        config = AutoConfig.for_model(**model_config(name_or_path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    text = config.get_text_config()
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    output = model.get_output_embeddings()
    linears = tuple((name.rsplit(".", 1)[-1], m.in_features, m.out_features) for name, m in model.named_modules()
                    if isinstance(m, torch.nn.Linear) and m is not output)
    return ModelShape(
        parameters=sum(p.numel() for p in model.parameters()),  # tied weights once, as parameters() yields them
        largest_layer=max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()),
        num_layers=text.num_hidden_layers, hidden=text.hidden_size,
        kv_hidden=getattr(text, "num_key_value_heads", heads) * head_dim,
        intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size), vocab=text.vocab_size,
        linear_shapes=linears)


@dataclass
class Workload:
    """What a job asks of each worker, in the plan's terms (each job's config builds one: `memory_workload`)."""

    shape: ModelShape
    num_workers: int
    use_gpu: bool
    zero: dict[str, Any]
    """DeepSpeed's `zero_optimization` as the job will hand it over (overrides included)."""
    mixed_precision: bool
    """16-bit weights with a 32-bit master copy (DeepSpeed's bf16 mode, GPUs); False: fp32 weights."""
    activation_bytes: int
    """Bytes of an activation element: 2 under bf16 (weights or autocast), 4 in fp32."""
    tokens: int
    """Tokens through the model per micro batch (sequences x length; DPO's chosen and rejected both)."""
    gradient_checkpointing: bool = False
    logits: bool = True
    """The model ends in the vocabulary's logits (False: a reward model's one score)."""
    trainable: int | None = None
    """Trainable parameters (a LoRA adapter's); None: all of them."""
    reference_model: bool = False
    """A frozen copy of the model beside it (DPO; GRPO with beta > 0), partitioned like it under ZeRO-3."""
    vllm_share: float | None = None
    """GPU: the share of the device a colocated vLLM engine claims (rollout.gpu_memory_utilization)."""
    vllm_kv_cache_bytes: int | None = None
    """CPU: a colocated vLLM engine's KV cache (its weights are counted beside it)."""
    device_memory_bytes: int | None = None
    """The device's memory as the config states it (`scaling.device_memory_bytes`); None: found on this machine."""
    local: bool = True
    """Ray starts on this machine (no `ray.address`): its memory is the workers' when they are CPU workers."""
    object_store_bytes: int = 0
    """The object store of the Ray that the job starts here (`ray.object_store_memory_mb`)."""


@dataclass
class Plan:
    device: dict[str, int]
    """Bytes per worker's device, by item."""
    host: dict[str, int]
    """Bytes per worker in host memory, by item (offloaded states; on CPU workers folded into `device`)."""
    capacity: int | None
    capacity_source: str
    use_gpu: bool
    model_states_bytes: int
    """The items DeepSpeed's estimators count (parameters, gradients, optimizer states, largest layer) on the device."""

    @property
    def total(self) -> int:
        return sum(self.device.values())

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.total <= self.capacity

    def describe(self) -> str:
        kind = "GPU" if self.use_gpu else "CPU worker (host memory)"
        lines = [f"memory plan, per {kind}:"]
        lines += [f"  {name:<34} {gib(size):>10}" for name, size in self.device.items() if size]
        lines.append(f"  {'total':<34} {gib(self.total):>10}")
        if any(self.host.values()):
            lines.append("  host memory per worker (offloaded): " + ", ".join(
                f"{name} {gib(size)}" for name, size in self.host.items() if size))
        if self.capacity is None:
            lines.append(f"  capacity: unknown ({self.capacity_source}); set scaling.device_memory_bytes to check")
        else:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"  capacity {gib(self.capacity)} ({self.capacity_source}): {verdict}")
        return "\n".join(lines)


def gib(size: float) -> str:
    return f"{size / GiB:.2f} GiB" if size >= GiB / 10 else f"{size / 2**20:.1f} MiB"


def estimate(work: Workload) -> Plan:
    """Per-device bytes of `work` (see the module's docstring for the model-state accounting)."""
    s, n, zero = work.shape, work.num_workers, work.zero
    stage = int(zero.get("stage", 0))
    offload_optimizer = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    offload_param = stage == 3 and zero.get("offload_param", {}).get("device", "none") not in ("none", None)
    p = s.parameters
    t = p if work.trainable is None else work.trainable
    w = 2 if work.mixed_precision else 4  # bytes of a working weight or gradient
    shard = n if stage >= 1 else 1
    params_split = n if stage == 3 else 1
    if stage == 3:
        working_grads = 0  # reduced straight into the 32-bit partition
    elif stage == 2:
        working_grads = w * t / n
    else:
        working_grads = w * t if (stage == 1 or work.mixed_precision) else 0
    optimizer = 8 * t if stage == 0 and not work.mixed_precision else 12 * t / shard

    device: dict[str, int] = {}
    host: dict[str, int] = {}
    where_params = host if offload_param else device
    where_states = host if offload_optimizer else device
    if work.trainable is None:
        where_params["parameters"] = int(w * p / params_split)
    else:
        where_params["parameters (trained)"] = int(w * t / params_split)
        where_params["parameters (frozen)"] = int(w * (p - t) / params_split)
    device["gradients (16-bit)" if work.mixed_precision else "gradients"] = 0 if offload_optimizer else int(
        working_grads)
    where_states["gradients (32-bit partition)" if stage else "gradients (32-bit)"] = int(4 * t / shard)
    where_states["optimizer states"] = int(optimizer)
    device["largest layer, gathered (ZeRO-3)"] = 4 * s.largest_layer if stage == 3 else 0
    model_states = sum(device.values())
    if stage == 3:
        max_live = int(float(zero.get("stage3_max_live_parameters", 1e9)))
        device["other gathered parameters (ZeRO-3)"] = max(0, w * min(p, max_live) - 4 * s.largest_layer)
    if stage >= 2:
        buckets = ("reduce_bucket_size", "stage3_prefetch_bucket_size") if stage == 3 else ("reduce_bucket_size",)
        device["ZeRO buffers"] = 4 * sum(int(float(zero.get(key, DEEPSPEED_BUCKET_DEFAULTS[key]))) for key in buckets)
    device.update(activations(work))
    if work.reference_model:
        device["reference model"] = int(w * p / (n if stage == 3 else 1))
    if work.use_gpu:
        device["CUDA context, NCCL, allocator"] = GPU_RUNTIME_BYTES
    else:
        device["worker process"] = CPU_WORKER_BYTES
        if work.vllm_kv_cache_bytes is not None:
            device["colocated vLLM (weights + KV cache)"] = int(w * p + work.vllm_kv_cache_bytes)
        device.update({f"{name} (offloaded to host)": size for name, size in host.items()})
        host = {}
    capacity, source = device_capacity(work)
    if work.use_gpu and work.vllm_share is not None and capacity is not None:
        device["colocated vLLM (rollout.gpu_memory_utilization)"] = int(work.vllm_share * capacity)
    return Plan(device=device, host=host, capacity=capacity, capacity_source=source, use_gpu=work.use_gpu,
                model_states_bytes=model_states)


def activations(work: Workload) -> dict[str, int]:
    """Saved activations of one micro batch through a Llama-style block, per token and layer: the two norms' inputs
    (kept in fp32 by HF's RMSNorm, counted as 2 hidden each), q/k/v's input, q and k after RoPE, the attention's q,
    k, v and output, o_proj's and the MLP's inputs (10 hidden + 2 kv hidden), and the MLP's gate, SiLU, up and
    product (4 intermediate). Gradient checkpointing keeps each layer's input and recomputes one layer at a time.
    The logits: the model's, their fp32 copy for the loss, and its gradient."""
    s, a, tokens = work.shape, work.activation_bytes, work.tokens
    per_layer = tokens * (10 * s.hidden + 2 * s.kv_hidden + 4 * s.intermediate) * a
    saved = (s.num_layers * tokens * s.hidden * a + per_layer if work.gradient_checkpointing
             else s.num_layers * per_layer)
    key = "activations (checkpointed)" if work.gradient_checkpointing else "activations"
    return {key: int(saved), "logits and their gradient": int(tokens * s.vocab * (a + 8)) if work.logits else 0}


def device_capacity(work: Workload) -> tuple[int | None, str]:
    """(bytes, where the figure comes from) of one worker's device."""
    if work.device_memory_bytes is not None:
        return work.device_memory_bytes, "scaling.device_memory_bytes"
    if not work.local:
        return None, "the workers run on a cluster"
    if work.use_gpu:
        import torch

        if not torch.cuda.is_available():
            return None, "this machine has no GPU"
        total = torch.cuda.get_device_properties(0).total_memory
        return total, f"{torch.cuda.get_device_name(0)}"
    import os

    import psutil

    total = psutil.virtual_memory().total
    threshold = float(os.environ.get("RAY_memory_usage_threshold", RAY_MEMORY_THRESHOLD))
    usable = total * threshold - RAY_LOCAL_OVERHEAD_BYTES - work.object_store_bytes
    return int(usable / work.num_workers), (f"this machine's {gib(total)} x {threshold} (Ray's memory monitor) "
                                            f"less {gib(RAY_LOCAL_OVERHEAD_BYTES)} for Ray and its "
                                            f"{gib(work.object_store_bytes)} object store, over {work.num_workers} "
                                            f"workers")


# ---------------------------------------------------------------------------------------------------------------
# From a job's config
# ---------------------------------------------------------------------------------------------------------------


def workload(cfg, shape: ModelShape, *, tokens: int, gradient_checkpointing: bool, buffers_sized: bool = True,
             **extra) -> Workload:
    """The shared part of every job's `memory_workload`: scaling, DeepSpeed and where Ray runs, from `cfg`.
    `buffers_sized`: the job sizes ZeRO's buffers to the model (pretraining); else they are DeepSpeed's own."""
    import os

    from rayloop.train import zero_optimization

    ds, scaling = cfg.deepspeed, cfg.scaling
    zero = zero_optimization(ds, scaling.use_gpu, shape.hidden if buffers_sized else None)
    # GPUs train in DeepSpeed's bf16 mode unless told fp32; CPUs keep fp32 weights, and autocast (bf16) saves most
    # activations in bf16. `auto` on a CPU is counted as fp32: the larger figure, without measuring the CPU here.
    bf16 = ds.precision == "bf16" or (ds.precision == "auto" and scaling.use_gpu)
    return Workload(shape=shape, num_workers=scaling.num_workers, use_gpu=scaling.use_gpu, zero=zero,
                    mixed_precision=scaling.use_gpu and ds.precision != "fp32", activation_bytes=2 if bf16 else 4,
                    tokens=tokens, gradient_checkpointing=gradient_checkpointing,
                    device_memory_bytes=None if scaling.device_memory_bytes is None else int(scaling.device_memory_bytes),
                    local=cfg.ray.address is None and not os.environ.get("RAY_ADDRESS"),
                    object_store_bytes=cfg.ray.object_store_memory_mb * 2**20, **extra)


# Knobs tried, in order, on a config that does not fit: the first set with which it fits is the one named.
REMEDIES: list[dict[str, Any]] = [
    {"train.gradient_checkpointing": True},
    {"deepspeed.zero_stage": 3},
    {"deepspeed.zero_stage": 3, "train.gradient_checkpointing": True},
    {"deepspeed.zero_stage": 3, "deepspeed.offload_optimizer": True},
    {"deepspeed.zero_stage": 3, "deepspeed.offload_optimizer": True, "train.gradient_checkpointing": True},
    {"deepspeed.zero_stage": 3, "deepspeed.offload_optimizer": True, "deepspeed.offload_param": True},
    {"deepspeed.zero_stage": 3, "deepspeed.offload_optimizer": True, "deepspeed.offload_param": True,
     "train.gradient_checkpointing": True},
]


def plan_of(cfg) -> Plan | None:
    """The plan of a job's config; None where the job has none or its model is yet to be written (a pipeline's
    later stage)."""
    workload_of = getattr(cfg, "memory_workload", None)
    if workload_of is None:
        return None
    try:
        work = workload_of()
    except ValueError:
        return None
    return None if work is None else estimate(work)


def check(cfg) -> Plan | None:
    """The config's plan; ConfigError in one line when it does not fit: the estimate, the capacity, and the knobs
    that would make it fit."""
    from rayloop.config import ConfigError

    plan = plan_of(cfg)
    if plan is None or plan.fits:
        return plan
    head = (f"memory plan: {gib(plan.total)} per {'GPU' if plan.use_gpu else 'CPU worker'}, over the "
            f"{gib(plan.capacity)} it has ({plan.capacity_source}); --plan itemises it")
    for edits in REMEDIES:
        if all(_current(cfg, k) == v for k, v in edits.items()):
            continue
        fixed = plan_of(_with(cfg, edits))
        if fixed is not None and fixed.fits:
            knobs = " ".join(f"--{k}={str(v).lower()}" for k, v in edits.items() if _current(cfg, k) != v)
            host = f", {gib(sum(fixed.host.values()))} host memory per worker" if any(fixed.host.values()) else ""
            raise ConfigError(f"{head}. It fits with {knobs} ({gib(fixed.total)}{host})")
    raise ConfigError(f"{head}. Neither gradient checkpointing, ZeRO-3 nor offload makes it fit: more workers, a "
                      f"smaller batch, LoRA or a smaller model")


def _current(cfg, dotted: str):
    section, name = dotted.split(".")
    return getattr(getattr(cfg, section), name)


def _with(cfg, edits: dict[str, Any]):
    """A copy of `cfg` with `edits` (dotted names) set, unvalidated: for the plan alone."""
    copy = cfg.model_copy(deep=True)
    for dotted, value in edits.items():
        section, name = dotted.split(".")
        setattr(getattr(copy, section), name, value)
    return copy
