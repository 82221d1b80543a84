"""Typed configs: pydantic models loaded from YAML, with dotted command-line overrides.

    python -m jobs.pretrain --config jobs/configs/pretrain_tiny.yaml --optim.lr=3e-4 --scaling.num_workers=2

Every section forbids unknown keys and documents each field with the docstring under it (litgpt style), so
``--help`` can list them. Validation happens completely before Ray starts: a bad config costs no cluster.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable, ClassVar, Literal, TypeVar

import yaml
from pydantic import (BaseModel, ByteSize, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

C = TypeVar("C", bound="Section")
MiB = 1 << 20


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field and fits on one line."""


class JobError(RuntimeError):
    """A run that failed for a reason the user can act on, said in one line (`run_cli` prints it, exit 1)."""


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, field docstrings become descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


# ---------------------------------------------------------------------------------------------------------------
# Sections shared by every job. Defined once; each job's config composes the ones it needs.
# ---------------------------------------------------------------------------------------------------------------


class RaySection(Section):
    address: str | None = None
    """Ray cluster to join (`auto`, `ray://host:10001`, `host:6379`). Unset: `RAY_ADDRESS`, else start a local one."""
    num_cpus: int | None = Field(default=None, ge=1)
    """Logical CPUs of a locally started cluster. Unset: max(8, cores), so Train and Serve both schedule on a laptop."""
    object_store_memory_mb: int = Field(default=1024, ge=75)
    """Object store size of a locally started cluster, in MiB (Ray's minimum is 75)."""


class ModelSection(Section):
    name_or_path: str = "tiny"
    """A preset (`tiny`, `small`, `125m`) built locally from scratch, or an HF model folder: local, in storage
    (`s3://...`), a checkpoint of a rayloop job or a run folder (its newest registered checkpoint)."""
    vocab_size: int = Field(default=512, ge=300)
    """Target vocabulary of the byte-level BPE tokenizer trained for a preset (ignored for HF folders)."""
    seed: int = 0
    """Seed of the randomly initialised weights of a preset."""

    @field_validator("name_or_path")
    @classmethod
    def _preset_or_folder(cls, value: str) -> str:
        from rayloop.models import PRESETS, resolve_model_folder  # local: models imports torch lazily

        if value in PRESETS:
            return value
        try:
            return resolve_model_folder(value)
        except ValueError as exc:
            raise ValueError(f"{value!r} is neither a preset ({', '.join(PRESETS)}) nor a model: {exc}") from None


class StartModelSection(Section):
    name_or_path: str
    """The model to post-train: a local HF folder, a checkpoint of any rayloop job, or a run folder (its newest
    checkpoint), e.g. `~/rayloop-runs/sft-tiny`."""
    attn_implementation: str | None = None
    """transformers' attention kernel (`sdpa`, `eager`, `flash_attention_2` on GPUs with it installed); unset: the
    model's default."""

    @field_validator("name_or_path")
    @classmethod
    def _resolves(cls, value: str, info: ValidationInfo) -> str:
        if (info.context or {}).get("model_from_previous_stage"):
            return value  # a pipeline stage: the previous stage writes it
        from rayloop.models import resolve_model_folder

        return resolve_model_folder(value)


class TaskSection(Section):
    max_digits: int = Field(default=2, ge=1, le=9)
    """Largest number of digits of an operand."""
    ops: list[Literal["+", "-"]] = ["+", "-"]
    """Operators the problems use."""
    num_train: int = Field(default=4000, ge=1)
    """Problems in the training split (pretraining corpus, SFT set, preference pairs)."""
    num_eval: int = Field(default=200, ge=1)
    """Problems in the held-out split, disjoint from the training split."""
    fixed_width: bool = True
    """Write operands zero-padded to `max_digits` and answers to one digit more (`07+45=052`), so that each digit of
    an answer sits at the same distance from the digits it is computed from in every problem. A small model learns
    that layout from far fewer examples than numbers as written (`7+45=52`), whose digits move with their lengths
    (bench/results/demo_seeds.md)."""
    seed: int = 0
    """Seed: the same seed gives the same problems, in the same order."""


class DataSection(Section):
    source: Literal["task", "text", "json", "parquet", "hf"] = "task"
    """`task`: the arithmetic task's corpus and held-out set; `text`: .txt files (one document per non-empty line);
    `json`: JSON or JSON-lines files; `parquet`: Parquet files; `hf`: an HF dataset folder (`datasets.save_to_disk`;
    the driver hands it to Ray Data whole: for a large corpus, Parquet streams). For json, parquet and hf the text
    is the column `text_field`."""
    path: str | None = None
    """File or folder for every source but `task`: local, or in storage (`s3://...`), which every node can read."""
    text_field: str = "text"
    """Column holding the text, for `json`, `parquet` and `hf`."""
    eval_fraction: float = Field(default=0.05, gt=0, lt=1)
    """Share of documents held out for eval loss (chosen by a hash of each document and the seed), for every source
    but `task`, whose held-out problems are its own."""
    eval_blocks: int = Field(default=1024, ge=1)
    """Most held-out blocks each worker evaluates on (the eval loss of a corpus of any size costs the same)."""
    loader: Literal["ray_data", "in_memory"] = "in_memory"
    """`ray_data`: the corpus streams through Ray Data (read, tokenized and packed in `map_batches`, handed to the
    TorchTrainer and read with `get_dataset_shard`): a worker's memory does not grow with the corpus; for corpora
    larger than a worker's memory. `in_memory`: each worker reads, tokenizes and packs the whole corpus itself.
    The two draw different data orders from the same seed; the demo's figures were measured in memory, and its SFT
    after a streamed pretraining has yet to be measured over seeds (bench/demo_seeds.py)."""
    read_ahead_bytes: ByteSize = ByteSize(8 * MiB)
    """Object store memory each worker's Ray Data stream may fill ahead of training (`8MiB`, `1GiB`): the stream
    reads and tokenizes this far ahead of the steps, no further, so it spends CPU time on data the steps will use."""
    shuffle_buffer_bytes: ByteSize = ByteSize(4 * MiB)
    """Packed blocks each worker draws the data order from, as a size in bytes (`4MiB`): the streamed corpus is
    shuffled within a window this large, differently each epoch. The window fills before the first step, so a
    larger one shuffles more widely and starts later."""
    seed: int = 0
    """Seed of the held-out choice and of the data order."""

    @model_validator(mode="after")
    def _path_exists(self):
        if self.source == "task":
            return self
        if self.path is None:
            raise ValueError(f"data.path is required for data.source={self.source!r}")
        from rayloop import storage

        if not storage.exists(storage.normalize(self.path)):
            raise ValueError(f"data.path: no such file or folder {self.path!r}")
        from rayloop.data import check_source

        check_source(self)  # the files and the text column, before Ray
        return self


class ScalingSection(Section):
    num_workers: int = Field(default=2, ge=1)
    """Ray Train workers (one process each; one GPU each when use_gpu)."""
    use_gpu: bool = False
    """Give each worker a GPU (NCCL); otherwise CPU workers (gloo)."""
    cpus_per_worker: float = Field(default=1, gt=0)
    """Logical CPUs reserved for each worker."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How Ray places the workers on nodes (Ray Train's ScalingConfig): `PACK` fills few nodes, `SPREAD` one
    worker per node where it can; the STRICT_ forms fail rather than do otherwise."""
    device_memory_bytes: ByteSize | None = None
    """Memory of each worker's device, for the memory plan that every training job checks before Ray starts
    (`80GB`, `24GiB`): a GPU's memory, or the host memory each CPU worker may use. Unset: found on this machine
    when the job starts Ray here (GPU 0's memory; for CPU workers, the memory Ray's memory monitor allows, shared
    by the workers); on a cluster the plan only estimates."""


class DeepSpeedSection(Section):
    zero_stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage: 0 plain data parallel, 1 shards optimizer state, 2 also gradients, 3 also parameters."""
    offload_optimizer: bool = False
    """Keep optimizer state (and its step) on the CPU. ZeRO stage >= 1."""
    offload_param: bool = False
    """Keep parameters on the CPU between uses. ZeRO stage 3 only."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """`auto`: bf16 where every worker's device computes it natively (a GPU with bf16; a CPU with AVX512-BF16 or
    AMX, or Arm's BF16), fp32 otherwise; `bf16`/`fp32` force either. On a CPU, bf16 means autocast: fp32
    weights and optimizer state, bf16 matrix multiplications (rayloop/precision.py). The job says which it chose."""
    overrides: dict[str, Any] = {}
    """DeepSpeed config keys merged over the generated config, passed through unchanged (DeepSpeed's own names)."""

    @model_validator(mode="after")
    def _offload_needs_sharding(self):
        if self.offload_param and self.zero_stage != 3:
            raise ValueError("deepspeed.offload_param needs deepspeed.zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
        # The job announces, logs and checkpoints the precision it chose; a precision key here would change it
        # behind that back.
        precision_keys = sorted({"bf16", "bfloat16", "fp16", "torch_autocast", "amp"} & set(self.overrides))
        if precision_keys:
            raise ValueError(f"deepspeed.overrides sets {', '.join(precision_keys)}: use deepspeed.precision")
        return self


class OptimSection(Section):
    lr: float = Field(default=3e-3, gt=0)
    """Peak learning rate (AdamW)."""
    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW weight decay."""
    warmup_steps: int = Field(default=10, ge=0)
    """Linear warm-up steps before the schedule."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """After warm-up: `cosine` decays to a tenth of `lr` (pretraining) or to zero (TRL jobs); `constant` holds
    `lr`, which suits online RL, whose data does not run out."""
    grad_clip: float = Field(default=1.0, ge=0)
    """Gradient norm clipping (0: off)."""


class StorageSection(Section):
    path: str = Field(default_factory=lambda: os.environ.get("RAYLOOP_STORAGE", "~/rayloop-runs"))
    """Where runs go: a local folder (on a cluster, a mount that every node shares) or object storage,
    `s3://bucket/prefix` (S3-compatible endpoints through `AWS_ENDPOINT_URL` and the other standard AWS variables).
    A run keeps everything under `<path>/<name>`: checkpoints, the base model, TensorBoard logs, PNG curves,
    results. Workers and replicas read from there, never from the driver's disk. Default: `$RAYLOOP_STORAGE`
    (cluster.yaml sets it on every node), else ~/rayloop-runs."""
    name: str | None = None
    """Run name: the folder under `path`; default the job's name. Running a job again with the same name resumes it."""

    @field_validator("path")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme = value.split("://", 1)[0] if "://" in value else None
        if scheme not in (None, "s3", "gs", "gcs", "file"):
            raise ValueError(f"{value!r}: use a local folder, a shared mount, or s3:// (or gs://)")
        return value.rstrip("/") if scheme else value

    def run_dir(self) -> str:
        """This run's folder: an absolute local path or a URI."""
        from rayloop import storage

        if self.name is None:
            raise ValueError("storage.name is unset (a JobConfig sets it to the job's name)")
        return storage.join(storage.normalize(self.path), self.name)

    def run_path(self, *parts: str) -> str:
        from rayloop import storage

        return storage.join(self.run_dir(), *parts)


class RegistrySection(Section):
    """Where the job registers the model it writes (MLflow's model registry; see rayloop/registry.py)."""

    enabled: bool = True
    """Register the job's model as a new version (false: write the model only)."""
    uri: str | None = None
    """MLflow tracking and registry URI (`sqlite:///path/mlflow.db`, `http://head:5000`). Unset:
    `$MLFLOW_TRACKING_URI`, else `<storage.path>/mlflow.db` for local storage, else `~/.rayloop/mlflow.db`."""
    model: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]+$")
    """Registered model the version goes to. Unset: `rayloop` (`rayloop-reward` for reward models)."""


class GenerateSection(Section):
    max_tokens: int = Field(default=8, ge=1)
    """New tokens per prompt."""
    temperature: float = Field(default=0.0, ge=0)
    """Sampling temperature (0: greedy)."""
    samples_per_prompt: int = Field(default=1, ge=1)
    """Completions sampled per prompt (vLLM's `n`)."""
    max_model_len: int = Field(default=256, ge=16)
    """Context length vLLM reserves KV cache for."""
    kv_cache_memory_bytes: ByteSize = ByteSize(256 * MiB)
    """vLLM's KV cache, in bytes (`268435456`, or `256MiB`, `2GiB`). A size, not vLLM's gpu_memory_utilization:
    on CPU that fraction is of the NUMA node's memory less the engine's own, so one value starts on one machine
    and fails on the next."""
    dtype: str = "auto"
    """vLLM weight dtype (`auto`, `bfloat16`, `float32`)."""
    enforce_eager: bool = True
    """Skip CUDA graphs and compilation: fast start, right for CPU and tests; set false on GPUs for throughput."""
    lora_path: str | None = None
    """A LoRA adapter folder (peft's, local or in storage) to generate with, on top of the model."""


class JobConfig(Section):
    """Base of every job's config: where Ray runs and where the run is stored."""

    job_name: ClassVar[str]
    ray: RaySection = RaySection()
    storage: StorageSection = Field(default_factory=StorageSection)
    registry: RegistrySection = RegistrySection()

    @model_validator(mode="after")
    def _default_run_name(self):
        if self.storage.name is None:
            self.storage.name = self.job_name
        return self


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--{dotted}: {key!r} is a value, not a section")
        node = child
    node[keys[-1]] = value


def _describe(error: ValidationError) -> str:
    parts = []
    for err in error.errors():
        field = ".".join(str(p) for p in err["loc"])
        message = err["msg"]
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        elif err["type"] == "missing":
            message = "required, and missing"
        elif err["type"] == "value_error":
            # Our validators' own words; section-level ones already start with the field(s) they are about.
            message = str(err["ctx"]["error"])
            if not field or message.startswith(field):
                parts.append(message)
                continue
        elif "input" in err and not isinstance(err["input"], dict | list):
            message += f" (got {err['input']!r})"
        parts.append(f"{field}: {message}")
    return "; ".join(parts)


def parse_args(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Split `--config PATH` (repeatable: later files merge over earlier ones) from `--a.b=value` / `--a.b value`
    overrides; values are parsed as YAML scalars."""
    config_paths, overrides, i = [], {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r} (expected --config PATH or --section.field=value)")
        key, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"--{key}: missing value")
            raw, i = argv[i + 1], i + 1
        i += 1
        if key == "config":
            config_paths.append(raw)
        else:
            overrides[key] = yaml.safe_load(raw) if raw != "" else ""
    return config_paths, overrides


def _merge(base: dict, over: dict) -> dict:
    """`over` merged into `base`, section by section (a mapping in both merges; anything else replaces)."""
    merged = dict(base)
    for key, value in over.items():
        merged[key] = (_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict)
                       else value)
    return merged


def _read_config_file(config_path: str) -> dict:
    file = Path(config_path)
    if not file.is_file():
        raise ConfigError(f"--config: no such file {config_path!r}")
    try:
        loaded = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config: {config_path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"--config: {config_path} must hold a mapping of sections, not {type(loaded).__name__}")
    return loaded or {}


def load_config(cls: type[C], argv: list[str] | None = None, *, path: str | None = None,
                context: dict | None = None) -> C:
    """Build a `cls` from optional YAML files (each merged over the one before) and dotted overrides; raise
    ConfigError naming the field.
    `context` reaches the validators (a pipeline marks models that an earlier stage has yet to write)."""
    config_paths, overrides = parse_args(list(argv or []))
    data: dict[str, Any] = {}
    for config_path in config_paths or ([path] if path is not None else []):
        data = _merge(data, _read_config_file(config_path))
    for dotted, value in overrides.items():
        _set_dotted(data, dotted, value)
    return validate(cls, data, context)


def validate(cls: type[C], data: dict, context: dict | None = None) -> C:
    """`cls` from plain data; ConfigError in one line naming the field."""
    try:
        return cls.model_validate(data, context=context)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def describe_fields(cls: type[Section], prefix: str = "") -> list[str]:
    """One line per leaf field: dotted name, default, description. Used by --help."""
    lines = []
    for name, field in cls.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, Section):
            lines += describe_fields(annotation, f"{prefix}{name}.")
        else:
            default = field.get_default(call_default_factory=True)
            lines.append(f"  --{prefix}{name}  (default {default!r})  {field.description or ''}".rstrip())
    return lines


VERBOSE_FLAG = "--verbose"
"""A job's flag for the output of Ray, vLLM, DeepSpeed and TRL on the terminal instead of the run's log file."""
PLAN_FLAG = "--plan"
"""A job's flag to print its memory plan (rayloop/plan.py) and exit, starting nothing."""


def run_cli(cls: type[C], main: Callable[[C], Any], argv: list[str] | None = None) -> Any:
    """Entry point of every job: validate the whole config first, then call main. Exit 2 with one line if bad.

    Unless `--verbose` is given, the output of Ray, vLLM, DeepSpeed and TRL goes to a log file under the run
    (its path said first), and the terminal keeps the job's own lines and a bar per stage (rayloop/console.py).
    """
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(f"usage: python -m <job> [--config PATH ...] [--section.field=value ...] [--verbose] [--plan]\n\n"
              f"{cls.__doc__ or ''}\n\n  --verbose  (flag)  Ray's, vLLM's, DeepSpeed's and TRL's output here "
              f"instead of the run's log file\n  --plan  (flag)  print the memory each worker's device will need, "
              f"and exit")
        print("\n".join(describe_fields(cls)))
        return None
    verbose, plan_only = VERBOSE_FLAG in argv, PLAN_FLAG in argv
    try:
        cfg = load_config(cls, [a for a in argv if a not in (VERBOSE_FLAG, PLAN_FLAG)])
        from rayloop import plan

        if plan_only:
            memory = plan.plan_of(cfg)
            print(memory.describe() if memory else f"{getattr(cfg, 'job_name', 'job')}: no memory plan for this "
                                                   f"job (or its model is written by an earlier stage)")
        plan.check(cfg)  # before Ray: a config that cannot fit its devices stops here
        if plan_only:
            return None
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    from rayloop import console

    log_file = None if verbose else console.quiet_into(_log_file(cfg))
    if log_file:
        console.say(f"{getattr(cfg, 'job_name', 'job')}: the output of Ray, vLLM, DeepSpeed and TRL goes to "
                    f"{log_file} (--verbose: here)")
    try:
        return main(cfg)
    except JobError as exc:
        console.say(f"error: {exc}", err=True)
        raise SystemExit(1) from None
    except Exception as exc:
        if not log_file:
            raise
        import traceback

        traceback.print_exc()  # into the log
        cause = root_cause(exc)
        lines = [line.strip() for line in str(cause).splitlines() if line.strip()] or [""]
        # A message that carries a remote traceback (a Ray task's) ends with the error; others start with it.
        line = lines[-1] if any(text.startswith("Traceback") for text in lines) else lines[0]
        console.say(f"error: {type(cause).__name__}: {line} (traceback in {log_file})", err=True)
        raise SystemExit(1) from None
    finally:
        if log_file:
            _keep_log(cfg, log_file)


def root_cause(exc: BaseException) -> BaseException:
    """The error behind Ray Train's wrappers: a worker's (the lowest rank that failed) or the controller's; a Ray
    task's error as raised in the task (its message ends with that error's last line)."""
    for _ in range(10):
        failures = getattr(exc, "worker_failures", None)
        if isinstance(failures, dict) and failures:
            exc = failures[min(failures)]
        elif getattr(exc, "controller_failure", None) is not None:
            exc = exc.controller_failure
        elif isinstance(getattr(exc, "cause", None), BaseException) and exc.cause is not exc:  # RayTaskError
            exc = exc.cause
        else:
            break
    return exc


def _log_file(cfg: Any) -> str:
    """`<run>/logs/<job>-<time>.log` for a run in a local folder; for one in object storage a local file under
    ~/.rayloop/logs, copied to `<run>/logs/` when the job ends."""
    import time

    name = f"{getattr(cfg, 'job_name', 'job')}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    from rayloop.storage import is_uri

    storage = getattr(cfg, "storage", None)
    if isinstance(storage, StorageSection) and not is_uri(storage.path):
        return os.path.join(storage.run_dir(), "logs", name)
    return os.path.join(os.path.expanduser("~/.rayloop/logs"), name)


def _keep_log(cfg: Any, log_file: str) -> None:
    from rayloop import console, storage as store

    storage = getattr(cfg, "storage", None)
    if not isinstance(storage, StorageSection) or not store.is_uri(storage.path):
        return
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        target = store.join(storage.run_dir(), "logs", os.path.basename(log_file))
        store.upload(log_file, target)
        console.say(f"{getattr(cfg, 'job_name', 'job')}: log kept at {target}")
        os.remove(log_file)
    except Exception as exc:  # noqa: BLE001 - the run's results are already stored; the log stays local
        console.say(f"warning: the log stays at {log_file} ({type(exc).__name__}: {exc})", err=True)
