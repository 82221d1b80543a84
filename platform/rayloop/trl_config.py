"""`trl.overrides`: any field of the job's TRL config class, by TRL's own name, from YAML, checked before Ray starts.

    trl:
      overrides: {loss_type: dr_grpo, scale_rewards: none}           # Dr. GRPO
      overrides: {importance_sampling_level: sequence, loss_type: grpo}  # GSPO

A post-training job builds its TRL config class (SFTConfig, RewardConfig, DPOConfig, GRPOConfig, RLOOConfig) from
rayloop's own sections (`train`, `optim`, `rollout`, ...); `trl.overrides` passes any other field of that class
through unchanged, as `deepspeed.overrides` does for DeepSpeed. `check` runs in the config's validation, so a bad
key or value costs one line and no cluster:
- a key that is no field of the class, with the nearest field names;
- a key that rayloop sets from a section of its own, with that section (one place says each thing);
- a value of the wrong type (the field's annotation, read from the class);
- a value outside the choices or bounds of the fields whose values TRL checks only mid-run or never (`CHOICES`,
  `BOUNDS`);
- whatever TRL's own `__post_init__` refuses, by building the class with the overrides.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from pydantic import Field

from rayloop.config import Section

# Keys of rayloop.posttrain.training_arguments: the fields every job sets, and where a user sets each instead.
TRAINING_ARGUMENTS: dict[str, str] = {
    "output_dir": "storage.name (the run's checkpoints go to storage)",
    "max_steps": "train.steps",
    "per_device_train_batch_size": "train.per_device_batch_size",
    "per_device_eval_batch_size": "train.per_device_batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "learning_rate": "optim.lr",
    "weight_decay": "optim.weight_decay",
    "warmup_steps": "optim.warmup_steps",
    "lr_scheduler_type": "optim.schedule",
    "max_grad_norm": "optim.grad_clip",
    "logging_steps": "train.log_every",
    "save_strategy": "train.checkpoint_every",
    "save_steps": "train.checkpoint_every",
    "save_total_limit": "train.keep_checkpoints",
    "report_to": "train.report_to",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "model_init_kwargs": "model.attn_implementation",
    "bf16": "deepspeed.precision",
    "use_cpu": "scaling.use_gpu",
    "deepspeed": "deepspeed (and deepspeed.overrides)",
    "seed": "train.seed",
    "data_seed": "train.seed",
    "dataloader_num_workers": "nothing: rayloop's workers load data in-process",
    "disable_tqdm": "nothing: the driver draws the stage's progress",
}
# Keys training_arguments leaves out that rayloop decides all the same: precision (deepspeed.precision), and the
# optimizer and sharding, which DeepSpeed's config holds (an `optim` here would be ignored under it; FSDP refuses to
# run beside it).
ALSO_RESERVED: dict[str, str] = {
    "fp16": "deepspeed.precision", "tf32": "deepspeed.precision", "half_precision_backend": "deepspeed.precision",
    "optim": "deepspeed.overrides (its `optimizer` section)", "optim_args": "deepspeed.overrides",
    "fsdp": "deepspeed (rayloop shards with DeepSpeed ZeRO)", "fsdp_config": "deepspeed (rayloop shards with ZeRO)",
}

# Fields whose values TRL checks only when the loss is first computed (a run that fails minutes into Ray) or never,
# with the values TRL documents for them. tests/unit/test_trl_config.py reads each field's help text in the installed
# TRL and fails when the two lists part.
CHOICES: dict[str, dict[str, tuple]] = {
    "GRPOConfig": {
        "loss_type": ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo"),
        "importance_sampling_level": ("token", "sequence"),
        "scale_rewards": ("group", "batch", "none", True, False),
        "vllm_importance_sampling_mode": ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"),
        "multi_objective_aggregation": ("sum_then_normalize", "normalize_then_sum"),
    },
    "DPOConfig": {
        "loss_type": ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                      "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"),
    },
}

# Numeric fields whose bounds nothing checks before vLLM or the loss trips over them mid-run: (test, the range).
_ONLINE_BOUNDS: dict[str, tuple[Any, str]] = {
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "top_k": (lambda v: v == -1 or v >= 0, "-1, 0 (all tokens) or a positive count"),
    "min_p": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "repetition_penalty": (lambda v: v > 0, "positive"),
    "num_iterations": (lambda v: v >= 1, "at least 1"),
    "epsilon": (lambda v: v >= 0, "at least 0"),
    "epsilon_high": (lambda v: v >= 0, "at least 0"),
    "top_entropy_quantile": (lambda v: 0 <= v <= 1, "in [0, 1]"),
}
BOUNDS: dict[str, dict[str, tuple[Any, str]]] = {"GRPOConfig": _ONLINE_BOUNDS, "RLOOConfig": _ONLINE_BOUNDS}


class TRLSection(Section):
    """TRL's own knobs for the job's trainer, beyond what rayloop's sections set."""

    overrides: dict[str, Any] = Field(default_factory=dict)
    """Fields of the job's TRL config class (SFTConfig, RewardConfig, DPOConfig, GRPOConfig or RLOOConfig), by
    TRL's own names, passed to it unchanged: `loss_type: dr_grpo`, `epsilon_high: 0.28`, `importance_sampling_level:
    sequence`, `num_iterations: 2`, `packing: true`. Checked against the class before Ray starts; fields that
    rayloop sets from a section of its own (`learning_rate`: optim.lr) are refused, naming that section."""


def check(config_cls: type, overrides: dict[str, Any], reserved: dict[str, str],
          known: dict[str, Any] | None = None) -> dict[str, Any]:
    """The overrides as `config_cls` takes them (`3e-4`, which YAML reads as a string, becomes a float); raise
    ValueError, one line starting `trl.overrides`, for the first one it cannot take. `reserved`: the fields the job
    sets itself, each with the rayloop field a user sets instead; `known`: the values of some of them (batch sizes,
    group size) that TRL's own checks of the overrides depend on."""
    import dataclasses
    import typing

    name = config_cls.__name__
    fields = {f.name: f for f in dataclasses.fields(config_cls) if f.init}
    hints = typing.get_type_hints(config_cls)
    taken = {**TRAINING_ARGUMENTS, **ALSO_RESERVED, **reserved}
    checked: dict[str, Any] = {}
    for key, value in overrides.items():
        where = f"trl.overrides.{key}"
        if key in taken:
            raise ValueError(f"{where}: rayloop sets {name}.{key} itself; use {taken[key]}")
        if key not in fields:
            near = difflib.get_close_matches(key, fields, n=3)
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            raise ValueError(f"{where}: {name} (TRL {_trl_version()}) has no field {key!r}{hint}")
        choices = CHOICES.get(name, {}).get(key)
        if choices is not None:
            values = value if isinstance(value, list) and hints.get(key) == list[str] else [value]
            bad = [v for v in values if not any(v == c and type(v) is type(c) for c in choices)]
            if bad or not values:
                raise ValueError(f"{where}: {bad[0] if bad else value!r} is not one of "
                                 f"{', '.join(repr(c) for c in choices)}")
            checked[key] = value
            continue
        checked[key] = value = _coerced(where, hints[key], value)
        bound = BOUNDS.get(name, {}).get(key)
        if bound is not None and value is not None and not bound[0](value):
            raise ValueError(f"{where}: {value!r} must be {bound[1]}")
    if checked:
        _built_by_trl(config_cls, checked, known or {})
    return checked


def _coerced(where: str, hint, value):
    """`value` as the field's annotation has it: pydantic's lax mode, but a bool is no number and a number no
    string (`loss_type: 1` is a mistake, not "1")."""
    from pydantic import TypeAdapter, ValidationError

    try:
        adapter = TypeAdapter(hint)
    except Exception:  # noqa: BLE001 - an annotation pydantic cannot read: TRL's __post_init__ decides
        return value
    try:
        if isinstance(value, bool) or not isinstance(value, str):
            return adapter.validate_python(value, strict=True)
        return adapter.validate_python(value)  # a YAML string: "3e-4" is a float to a float field
    except ValidationError as exc:
        raise ValueError(f"{where}: {value!r} is not a valid {_type_name(hint)} ({exc.errors()[0]['msg']})") from None


def build(config_cls: type, rayloop_args: dict[str, Any], overrides: dict[str, Any]):
    """`config_cls` from rayloop's keywords plus `trl.overrides` (checked by `check` at validation already)."""
    clash = sorted(set(rayloop_args) & set(overrides))
    if clash:  # `check` refuses these unless a job passes a keyword its `trl_reserved` does not list
        raise ValueError(f"trl.overrides sets {', '.join(clash)}, which rayloop sets for {config_cls.__name__} too")
    return config_cls(**rayloop_args, **overrides)


def _built_by_trl(config_cls: type, overrides: dict[str, Any], known: dict[str, Any]) -> None:
    """TRL's own checks in `__post_init__` (generation batch sizes, ...), on a throwaway instance: a CPU run
    writing nowhere, with the job's `known` values and TRL's defaults for everything else. (Building it also sets
    up accelerate's process state for a CPU in this process, the driver, which trains nothing itself.)"""
    import tempfile

    try:
        config_cls(**{"output_dir": tempfile.gettempdir(), "use_cpu": True, "report_to": [], **known}, **overrides)
    except (ValueError, TypeError) as exc:
        message = " ".join(str(exc).split())
        raise ValueError(f"trl.overrides: {config_cls.__name__} refuses {_inline(overrides)}: {message}") from None


def _inline(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in overrides.items())


def _type_name(hint) -> str:
    return re.sub(r"\btyping\.", "", getattr(hint, "__name__", None) or str(hint))


def _trl_version() -> str:
    import trl

    return trl.__version__
