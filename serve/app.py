"""The Serve application: vLLM engines behind `ray.serve.llm`, OpenAI-compatible, behind an API key.

    serve run serve/configs/tiny_cpu.yaml                    # Serve's own config file; `serve deploy` alike
    python -m serve.deploy --model ~/rayloop-runs/sft-tiny   # one model from its folder
    rayloop serve up --endpoint prod --model rayloop@3       # a registered version, promoted and rolled back later

The application reads in three parts: serve/config.py (what it serves: `ServeAppConfig`), serve/guard.py (the HTTP
guard: API key, body type and size, admission) and this builder. Each entry of `models` is one
`ray.serve.llm.LLMConfig` (one vLLM engine per replica, autoscaled by Serve). HTTP reaches the engines in one of two
shapes (`ingress`):
- `openai`: ray.serve.llm's own `OpenAiIngress` replica in front of one deployment per model (/v1/completions,
  /v1/chat/completions, /v1/models, streaming). `build_openai_app` offers no hook for ASGI middleware, so it cannot
  check an API key before the body is parsed, cap the body size, or add /health; `build_app` therefore repeats its
  last few lines (deployments, model cards, ingress) with a FastAPI app that has those three.
- `direct` (one model): the engine replica is the ingress and serves vLLM's own OpenAI app, the shape of
  ray.serve.llm's direct streaming; with Ray's HAProxy on, requests skip Serve's proxy actor and any ingress
  replica. On 2 CPU cores that is the difference between ~0.7 and ~0.9 of vLLM's own server (bench/serve.py).

A model entry's `version` (a registry version, `rayloop@3`) is named by every response of its engine: in
`system_fingerprint` and in the `x-rayloop-model-version` header. Deploying the application again with another version is a rolling update that starts the new replicas before
the old ones stop (Serve's `max_surge_percent`), so no request is dropped: that is how `rayloop promote` and
`rollback` move an endpoint. Everything else is left to ray.serve.llm and vLLM.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from serve.config import ModelEntry, ServeAppConfig
from serve.guard import VERSION_HEADER, GuardMiddleware, key_digest, openai_error, read_api_key, stamp_events


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
                      max_ongoing_requests=entry.max_ongoing_requests, max_queued_requests=entry.max_queued_requests,
                      graceful_shutdown_timeout_s=entry.graceful_shutdown_timeout_s)
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


def stamp_version(item, version: str):
    """One output of an engine with `system_fingerprint` set to `version`: a response object, or a batch of
    server-sent events (`data: {...}\n\n` strings, as ray.serve.llm batches a stream)."""
    if isinstance(item, list):
        return [stamp_version(event, version) for event in item]
    if isinstance(item, str):
        return stamp_events(item, version)
    if hasattr(item, "system_fingerprint"):
        item.system_fingerprint = version
    return item


def version_in(chunk) -> str | None:
    """The `system_fingerprint` of the first event of a streamed chunk (str or bytes), if any."""
    text = chunk.decode() if isinstance(chunk, bytes) else str(chunk)
    for event in text.split("\n\n"):
        if event.startswith("data: {"):
            return json.loads(event[len("data: "):]).get("system_fingerprint")
    return None


def _llm_server_class():
    # Private: the Batcher and the middleware hook have no public module; LLMServer itself is public.
    from ray.llm._internal.serve.core.server.llm_server import _add_middleware_to_built_app
    from ray.llm._internal.serve.utils.batcher import Batcher
    from ray.serve.llm.deployment import LLMServer

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
        """ray.serve.llm's LLMServer with `FirstChunkNowBatcher` for its streams, its model version stamped on
        every output, and, where it is the ingress itself (`ingress: direct`), `GuardMiddleware` in front of vLLM's
        own OpenAI app."""

        batcher_cls = FirstChunkNowBatcher

        async def __init__(self, llm_config, *, http_guard: dict | None = None, model_version: str | None = None,
                           **kwargs):
            self._http_guard = http_guard  # GuardMiddleware's arguments, given by build_app for `direct`
            self._model_version = model_version
            await super().__init__(llm_config, **kwargs)

        async def completions(self, request, raw_request_info=None):
            return self._stamped(await super().completions(request, raw_request_info))

        async def chat(self, request, raw_request_info=None):
            return self._stamped(await super().chat(request, raw_request_info))

        async def _stamped(self, outputs):
            # system_fingerprint is the OpenAI field that names what answered. vLLM's own (`fingerprint_mode`)
            # marks only non-streamed answers and a stream's last chunk; this marks every chunk.
            async for item in outputs:
                yield stamp_version(item, self._model_version) if self._model_version else item

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


# An `openai`-shape request whose engine replica dies before its first output is sent to another replica, this
# many times in all, waiting REPLICA_LOSS_BACKOFF_S x the attempt number between.
REPLICA_LOSS_ATTEMPTS = 3
REPLICA_LOSS_BACKOFF_S = 0.2


def replica_lost(exc: BaseException) -> bool:
    """Whether a call's error is the loss of the replica that ran it. An actor error raised *inside* a live replica
    (one of its own actors died: a RayTaskError that is also an ActorDiedError) is that replica's answer, not its
    loss, and another try may reach the same replica."""
    from ray.exceptions import RayActorError, RayTaskError

    return isinstance(exc, RayActorError) and not isinstance(exc, RayTaskError)


def _ingress_class():
    from fastapi import Response
    from fastapi.responses import JSONResponse, StreamingResponse
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError
    from ray.serve.llm.ingress import OpenAiIngress

    logger = logging.getLogger("ray.serve")

    class RayloopIngress(OpenAiIngress):
        """ray.serve.llm's OpenAI ingress plus /health, which asks every model's engine, and two error answers it
        gets wrong: a full queue (Serve's BackPressureError) reaches the client as a bare-text 503, and a chat
        message that fails validation while ray.serve.llm re-checks it (e.g. a content part of unknown type)
        as a 500. A request whose engine replica dies before answering goes to another replica (a 503 when none
        answers). It also copies the engine's model version (`system_fingerprint`) into the
        `x-rayloop-model-version` header: the engine that answered knows its version, the ingress does not."""

        async def _process_llm_request(self, body, call_method, raw_request=None):
            try:
                response = await self._answer_from_a_live_engine(body, call_method, raw_request)
            except BackPressureError:
                response = openai_error(503, f"Model {body.model!r} is at capacity (its queue is full); retry "
                                             f"shortly.", "server_overloaded", "overloaded")
                response.headers["Retry-After"] = "1"
                return response
            except RayActorError as exc:
                if not replica_lost(exc):
                    raise
                response = openai_error(503, f"Model {body.model!r} lost its engine replica mid-request; retry "
                                             f"shortly.", "server_error", "replica_lost")
                response.headers["Retry-After"] = "1"
                return response
            except ValueError as exc:  # pydantic's ValidationError included: the request, not the server
                return openai_error(400, str(exc).splitlines()[0], "invalid_request_error", "invalid_parameter")
            if isinstance(response, JSONResponse):
                if version := json.loads(response.body).get("system_fingerprint"):
                    response.headers[VERSION_HEADER] = version
            elif isinstance(response, StreamingResponse):
                # The first chunk is ready (ray.serve.llm peeked at it for errors), so reading it costs no wait.
                chunks = response.body_iterator
                first = await anext(chunks, None)
                if first is not None and (version := version_in(first)):
                    response.headers[VERSION_HEADER] = version

                async def replay():
                    if first is not None:
                        yield first
                    async for chunk in chunks:
                        yield chunk

                response.body_iterator = replay()
            return response

        async def _answer_from_a_live_engine(self, body, call_method, raw_request):
            # Serve re-routes a request its replica refused, but not one whose replica died after taking it (the
            # router cannot know whether a request is safe to run twice). A generation is: until its first output
            # exists, nothing has reached the client, so it goes to another replica. The router drops a dead
            # replica (ActorDiedError) or probes it before choosing it again (ActorUnavailableError) from a
            # callback on its own loop, which the pause before each retry leaves time to run. An unavailable
            # replica may still be alive and finish the first attempt: its work is then done twice. A stream that
            # dies after its first chunk is cut, as before; retries are few, so a request that itself kills its
            # engine costs at most REPLICA_LOSS_ATTEMPTS replicas.
            for attempt in range(1, REPLICA_LOSS_ATTEMPTS + 1):
                try:
                    return await super()._process_llm_request(body, call_method, raw_request)
                except RayActorError as exc:
                    if not replica_lost(exc) or attempt == REPLICA_LOSS_ATTEMPTS:
                        raise
                    logger.warning(f"{body.model}: the engine replica died mid-request ({type(exc).__name__}); "
                                   f"sending it to another (attempt {attempt + 1} of {REPLICA_LOSS_ATTEMPTS})")
                    await asyncio.sleep(REPLICA_LOSS_BACKOFF_S * attempt)

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
    # Private: the model cards, the endpoint table and ray.serve.llm's FastAPI app, which build_openai_app uses but
    # no public module offers.
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata
    from ray.llm._internal.serve.core.ingress.ingress import DEFAULT_ENDPOINTS, init
    from ray.serve.llm import build_llm_deployment
    from ray.serve.llm.ingress import make_fastapi_ingress

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
        entry = cfg.models[0]
        guard = dict(key_sha256=digest, max_request_bytes=cfg.max_request_bytes,
                     max_in_flight=direct_admission_limit(entry),
                     model_version=entry.version)
        return build_llm_deployment(configs[0], deployment_cls=serve.ingress()(server_cls),
                                    name_prefix="LLMServer:", bind_kwargs={"http_guard": guard},
                                    override_serve_options={"max_surge_percent": entry.max_surge_percent})
    # ray.serve.llm's own deployment names ("LLMServer:<model id>"), not the subclass's: a new version of a model
    # keeps its deployment, so deploying it is a rolling update of that deployment.
    deployments = {c.model_id: build_llm_deployment(c, deployment_cls=server_cls, name_prefix="LLMServer:",
                                                    bind_kwargs={"model_version": m.version},
                                                    override_serve_options={"max_surge_percent": m.max_surge_percent})
                   for c, m in zip(configs, cfg.models)}
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
    options["max_surge_percent"] = 100  # it takes no resources, so a new ingress always starts before the old stops
    # An old ingress forwards streams until they end: it waits as long as the engines behind it.
    options["graceful_shutdown_timeout_s"] = max(m.graceful_shutdown_timeout_s for m in cfg.models)
    return serve.deployment(ingress, **options).bind(llm_deployments=deployments, model_cards=cards,
                                                     lora_paths=lora_paths)
