"""serve/app.py and serve/deploy.py without Ray: configs, the API-key and body-size guard, the LLMConfigs built."""

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rayloop.config import ConfigError, load_config
from serve.app import llm_config
from serve.config import AuthSection, ModelEntry, ServeAppConfig
from serve.guard import GuardMiddleware, key_digest, read_api_key
from serve.deploy import DeployConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("RAYLOOP_API_KEY", "secret")


def test_deploy_shortcut_takes_a_run_folder_and_names_the_model_after_it(model_dir):
    cfg = load_config(DeployConfig, [f"--model={model_dir}"])
    assert [m.id for m in cfg.models] == ["sft-tiny"]
    assert cfg.models[0].path.endswith("checkpoint_2026-01-01_00-00-00.000000/checkpoint")
    assert cfg.host == "127.0.0.1" and cfg.auth.enabled  # loopback and a key unless said otherwise
    assert cfg.app_args().models == cfg.models


@pytest.mark.parametrize("overrides, message", [
    ([], r"models: required, and missing \(or give --model <folder>\)"),
    (["--model=/nope"], r"models.0.path: no model at '/nope'"),
    (["--model={m}", "--models.autoscaling.min_replicas=3"], r"model and models"),
    (["--model={m}", "--accelerator=tpu"], r"accelerator: Input should be 'cpu' or 'gpu'"),
    (["--model={m}", "--port=0"], r"port: Input should be greater than or equal to 1"),
    (["--model={m}", "--model_id=a b"], r"models.0.id: String should match pattern"),
    (["--model={m}", "--auth.enabled=maybe"], r"auth.enabled: Input should be a valid boolean"),
    (["--model={m}", "--max_request_bytes=10"], r"max_request_bytes: Input should be greater than or equal to 1024"),
])
def test_bad_deploy_configs_name_the_field(model_dir, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DeployConfig, [o.format(m=model_dir) for o in overrides])


def test_deploy_without_a_key_is_a_config_error_unless_auth_is_off(model_dir, monkeypatch):
    monkeypatch.delenv("RAYLOOP_API_KEY")
    with pytest.raises(ConfigError, match=r"^auth: enabled, but no API key is set: export RAYLOOP_API_KEY"):
        load_config(DeployConfig, [f"--model={model_dir}"])
    assert not load_config(DeployConfig, [f"--model={model_dir}", "--auth.enabled=false"]).auth.enabled


def test_autoscaling_bounds_are_checked(model_dir):
    with pytest.raises(ConfigError, match=r"models.0.autoscaling: min_replicas \(3\) is above max_replicas \(2\)"):
        load_config(ServeAppConfig, ["--models", f"[{{id: a, path: '{model_dir}', autoscaling: {{min_replicas: 3}}}}]"])


def test_lora_adapters_must_live_in_cloud_storage(model_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"models.0.lora_path: ray.serve.llm loads LoRA adapters from s3://"):
        load_config(ServeAppConfig, ["--models", f"[{{id: a, path: '{model_dir}', lora_path: '{tmp_path}'}}]"])
    entry = ModelEntry(id="a", path=str(model_dir), lora_path="s3://bucket/adapters/", max_loras=3)
    cfg = llm_config(entry, "cpu")
    assert cfg.lora_config.dynamic_lora_loading_path == "s3://bucket/adapters"
    assert cfg.engine_kwargs["enable_lora"] is True and cfg.engine_kwargs["max_loras"] == 3


def test_duplicate_model_ids_are_refused(model_dir):
    with pytest.raises(ConfigError, match=r"ids must be unique"):
        load_config(ServeAppConfig, ["--models", f"[{{id: a, path: '{model_dir}'}}, {{id: a, path: '{model_dir}'}}]"])


def test_bad_config_exits_2_before_ray_starts(model_dir):
    run = subprocess.run([sys.executable, "-m", "serve.deploy", f"--model={model_dir}", "--port=99999"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("config error: port:")
    assert "Started a local Ray instance" not in run.stderr


def test_api_key_from_file_first_then_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYLOOP_API_KEY", "from-env")
    assert read_api_key(AuthSection()) == "from-env"
    secret = tmp_path / "key"
    secret.write_text("from-file\n")
    assert read_api_key(AuthSection(api_key_file=str(secret))) == "from-file"
    monkeypatch.delenv("RAYLOOP_API_KEY")
    assert read_api_key(AuthSection()) is None
    with pytest.raises(ValueError, match="no such file"):
        read_api_key(AuthSection(api_key_file=str(tmp_path / "missing")))


def test_auth_without_key_refuses_to_build(model_dir, monkeypatch):
    from serve.app import build_app

    monkeypatch.delenv("RAYLOOP_API_KEY", raising=False)
    with pytest.raises(ValueError, match="auth.enabled is true but no API key is set: export RAYLOOP_API_KEY"):
        build_app({"models": [{"id": "m", "path": str(model_dir)}]})


def test_llm_config_on_cpu_asks_for_no_gpu_and_carries_scaling(model_dir):
    entry = ModelEntry(id="m", path=str(model_dir), max_queued_requests=5,
                       autoscaling={"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 2})
    cfg = llm_config(entry, "cpu")
    assert cfg.accelerator_config.kind == "cpu"
    assert cfg.placement_group_config == {"bundles": [{"CPU": 1}]}
    assert cfg.deployment_config["max_queued_requests"] == 5
    assert cfg.deployment_config["autoscaling_config"]["max_replicas"] == 3
    assert cfg.engine_kwargs["enforce_eager"] is True and cfg.lora_config is None
    assert cfg.experimental_configs["stream_batching_interval_ms"] == 200
    gpu = llm_config(entry, "gpu")
    assert gpu.accelerator_config is None or gpu.accelerator_config.kind != "cpu"
    assert gpu.engine_kwargs["enforce_eager"] is False


def test_serve_yaml_files_hold_valid_args(model_dir):
    for name in ("tiny_cpu.yaml", "gpu.yaml"):
        doc = yaml.safe_load((REPO / "serve" / "configs" / name).read_text())
        app = doc["applications"][0]
        assert app["import_path"] == "serve.app:build_app"
        args = app["args"]
        for model in args["models"]:
            model["path"] = str(model_dir)  # the folders exist only after training
        cfg = ServeAppConfig.model_validate(args)
        assert all(m.autoscaling.max_replicas >= m.autoscaling.min_replicas for m in cfg.models)
        assert cfg.auth.enabled


async def _call(guard, headers, body=b"{}", chunked=False):
    sent = []

    async def app(scope, receive, send):
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    raw = [(k.lower().encode(), v.encode()) for k, v in {"Content-Type": "application/json", **headers}.items()]
    if not chunked:
        raw.append((b"content-length", str(len(body)).encode()))
    guard.app = app
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": raw}
    await guard(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


@pytest.mark.parametrize("headers, status", [
    ({}, 401),
    ({"Authorization": "Bearer wrong"}, 401),
    ({"Authorization": "Basic secret"}, 401),
    ({"Authorization": "Bearer "}, 401),
    ({"Authorization": "Bearer secret"}, 200),
    ({"authorization": "bearer secret"}, 200),
])
def test_guard_checks_the_bearer_key(headers, status):
    guard = GuardMiddleware(None, key_sha256=key_digest("secret"), max_request_bytes=1024)
    code, body = asyncio.run(_call(guard, headers))
    assert code == status
    if status == 401:
        assert b'"code":"invalid_api_key"' in body and b'"error"' in body


def test_guard_wants_json_bodies():
    guard = GuardMiddleware(None, key_sha256=None, max_request_bytes=1024)
    code, body = asyncio.run(_call(guard, {"Content-Type": "application/x-www-form-urlencoded"}))
    assert code == 415 and b"unsupported_media_type" in body
    assert asyncio.run(_call(guard, {"Content-Type": "application/json; charset=utf-8"}))[0] == 200


def test_guard_caps_the_body_with_and_without_length():
    guard = GuardMiddleware(None, key_sha256=None, max_request_bytes=1024)
    assert asyncio.run(_call(guard, {}, body=b"x" * 2000))[0] == 413
    assert asyncio.run(_call(guard, {}, body=b"x" * 100))[0] == 200
    assert asyncio.run(_call(guard, {}, body=b"x" * 2000, chunked=True))[0] == 413
    assert asyncio.run(_call(guard, {}, body=b"x" * 100, chunked=True)) == (200, b"ok")


def test_guard_admits_max_in_flight_and_answers_503_beyond_it():
    release = asyncio.Event()

    async def slow_app(scope, receive, send):
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def call(guard, key="secret"):
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message):
            sent.append(message)

        headers = [(b"content-type", b"application/json"), (b"content-length", b"2"),
                   (b"authorization", f"Bearer {key}".encode())]
        await guard({"type": "http", "method": "POST", "path": "/v1/completions", "headers": headers}, receive, send)
        return sent[0]["status"], dict(sent[0]["headers"]), b"".join(m.get("body", b"") for m in sent[1:])

    async def scenario():
        guard = GuardMiddleware(slow_app, key_sha256=key_digest("secret"), max_request_bytes=1024, max_in_flight=2)
        admitted = [asyncio.create_task(call(guard)) for _ in range(2)]
        await asyncio.sleep(0.05)
        assert guard.in_flight == 2
        refused = await call(guard)
        unauthenticated = await call(guard, key="wrong")  # refused for the key, whatever the load
        release.set()
        done = await asyncio.gather(*admitted)
        after = await call(guard)  # the slots are free again
        return refused, unauthenticated, done, after, guard.in_flight

    refused, unauthenticated, done, after, in_flight = asyncio.run(scenario())
    assert refused[0] == 503 and refused[1][b"retry-after"] == b"1" and b'"code":"overloaded"' in refused[2]
    assert unauthenticated[0] == 401
    assert [d[0] for d in done] == [200, 200] and after[0] == 200 and in_flight == 0


def test_direct_ingress_is_one_model_behind_haproxy_unless_said(model_dir, monkeypatch):
    one = [{"id": "a", "path": str(model_dir)}]
    two = one + [{"id": "b", "path": str(model_dir)}]
    monkeypatch.delenv("RAY_SERVE_ENABLE_HA_PROXY", raising=False)
    assert not ServeAppConfig(models=one).direct_ingress()  # Serve's proxy actor: the batched OpenAI ingress
    assert ServeAppConfig(models=one, ingress="direct").direct_ingress()
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")
    assert ServeAppConfig(models=one).direct_ingress()
    assert not ServeAppConfig(models=two).direct_ingress()
    assert not ServeAppConfig(models=one, ingress="openai").direct_ingress()
    with pytest.raises(ConfigError, match=r"ingress: 'direct' serves exactly one model, got 2"):
        load_config(ServeAppConfig, ["--ingress=direct", "--models",
                                     f"[{{id: a, path: '{model_dir}'}}, {{id: b, path: '{model_dir}'}}]"])


def test_direct_llm_config_moves_the_queue_into_the_engine(model_dir):
    entry = ModelEntry(id="m", path=str(model_dir), max_ongoing_requests=4, max_queued_requests=6)
    cfg = llm_config(entry, "cpu", direct=True)
    assert cfg.engine_kwargs["max_num_seqs"] == 4  # vLLM runs 4 at once and queues the rest
    assert cfg.deployment_config["max_queued_requests"] == -1  # the guard refuses beyond 4 + 6, not Serve
    assert cfg.deployment_config["max_ongoing_requests"] > 10
    assert "max_num_seqs" not in llm_config(entry, "cpu").engine_kwargs
    custom = ModelEntry(id="m", path=str(model_dir), engine_kwargs={"max_num_seqs": 2})
    assert llm_config(custom, "cpu", direct=True).engine_kwargs["max_num_seqs"] == 2


def test_stream_batcher_sends_the_first_chunk_at_once_and_batches_the_rest():
    # The generator holds its later chunks until the first batch has reached the caller: ray.serve.llm's own
    # Batcher would hold that first chunk for the whole minute-long interval and time out here.
    gate: dict = {}

    async def chunks():
        yield "a"
        await gate["released"].wait()
        for chunk in "bcd":
            yield chunk

    from serve.app import _llm_server_class

    async def collect():
        gate["released"] = asyncio.Event()
        stream = _llm_server_class().batcher_cls(chunks(), interval_ms=60_000).stream()
        first = await asyncio.wait_for(stream.__anext__(), timeout=5)
        gate["released"].set()
        return [list(first)] + [list(batch) async for batch in stream]

    assert asyncio.run(collect()) == [["a"], ["b", "c", "d"]]  # the rest in one batch, when the stream ends


def test_stream_batcher_passes_errors_and_unbatched_streams_through():
    from serve.app import _llm_server_class

    batcher_cls = _llm_server_class().batcher_cls

    async def failing():
        yield "a"
        raise RuntimeError("engine died")

    async def collect(generator, interval_ms):
        return [list(batch) async for batch in batcher_cls(generator, interval_ms=interval_ms).stream()]

    with pytest.raises(RuntimeError, match="engine died"):
        asyncio.run(collect(failing(), 200))

    async def three():
        for chunk in "abc":
            yield chunk

    assert asyncio.run(collect(three(), 0)) == [["a"], ["b"], ["c"]]  # interval 0: every chunk on its own


def test_kv_cache_is_a_byte_size_never_a_memory_fraction(model_dir):
    entry = ModelEntry(id="m", path=str(model_dir), kv_cache_memory_bytes="64MiB")
    kwargs = llm_config(entry, "cpu").engine_kwargs
    assert kwargs["kv_cache_memory_bytes"] == 64 << 20
    assert "gpu_memory_utilization" not in kwargs  # on CPU a fraction of the NUMA node: differs between machines
    default = llm_config(ModelEntry(id="m", path=str(model_dir)), "cpu")
    assert default.engine_kwargs["kv_cache_memory_bytes"] == 256 << 20
    with pytest.raises(ValueError, match="kv_cache_memory_bytes"):
        ModelEntry(id="m", path=str(model_dir), kv_cache_memory_bytes="a lot")


def test_the_guard_names_the_model_version_in_every_answer_whole_events_only():
    """`direct` shape: vLLM's app writes the body; the guard adds the version (header and system_fingerprint),
    fixes a JSON body's length, and stamps a stream event by event even when one arrives split."""
    import asyncio
    import json

    from serve.guard import VERSION_HEADER

    def app_sending(content_type: bytes, chunks: list[bytes]):
        async def app(scope, receive, send):
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", content_type), (b"content-length", b"999")]})
            for i, chunk in enumerate(chunks):
                await send({"type": "http.response.body", "body": chunk, "more_body": i < len(chunks) - 1})
        return app

    def run(app) -> tuple[dict, bytes]:
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message):
            sent.append(message)

        guard = GuardMiddleware(app, key_sha256=None, max_request_bytes=1024, model_version="m@3")
        scope = {"type": "http", "path": "/v1/completions", "method": "POST",
                 "headers": [(b"content-type", b"application/json"), (b"content-length", b"2")]}
        asyncio.run(guard(scope, receive, send))
        return dict(sent[0]["headers"]), b"".join(m.get("body", b"") for m in sent[1:])

    body = json.dumps({"id": "x", "choices": [{"text": "5"}], "system_fingerprint": None}).encode()
    headers, out = run(app_sending(b"application/json", [body[:10], body[10:]]))
    assert headers[VERSION_HEADER.encode()] == b"m@3" and json.loads(out)["system_fingerprint"] == "m@3"
    assert int(headers[b"content-length"]) == len(out)

    events = b'data: {"choices": [{"text": "1"}]}\n\ndata: {"choices": [{"text": "\xc3\xa9"}]}\n\ndata: [DONE]\n\n'
    split = events.index(b"\xa9")  # inside an event, inside a UTF-8 character
    headers, out = run(app_sending(b"text/event-stream", [events[:split], events[split:]]))
    datas = [line for line in out.decode().split("\n\n") if line]
    assert [json.loads(d[6:])["system_fingerprint"] for d in datas[:2]] == ["m@3", "m@3"] and datas[2] == "data: [DONE]"
    assert json.loads(datas[1][6:])["choices"][0]["text"] == "é"



def run_ingress(monkeypatch, engine_calls, call_method="completions", tried=None):
    """RayloopIngress's request path with ray.serve.llm's own `_process_llm_request` (peek at the first output,
    JSON or a stream); only the engine replica behind its handle is replaced, by `engine_calls`: one async
    generator function per call. Returns the response, with a stream's body read whole, and the number of calls
    (also appended to `tried`, for a call that raises)."""
    from ray.serve.llm.ingress import OpenAiIngress

    import serve.app

    monkeypatch.setattr(serve.app, "REPLICA_LOSS_BACKOFF_S", 0)
    calls = iter(engine_calls)
    tried = [] if tried is None else tried

    def engine(self, *, body, call_method, raw_request=None):  # the handle's call of one engine replica
        tried.append(call_method)
        return next(calls)()

    monkeypatch.setattr(OpenAiIngress, "_get_response", engine)
    ingress_cls = serve.app._ingress_class()
    body = type("Body", (), {"model": "policy"})()

    async def answer():
        response = await ingress_cls._process_llm_request(object.__new__(ingress_cls), body, call_method)
        if hasattr(response, "body_iterator"):
            response.streamed = [chunk async for chunk in response.body_iterator]
        return response

    return asyncio.run(answer()), len(tried)


def completion():
    from ray.llm._internal.serve.core.configs.openai_api_models import CompletionResponse

    return CompletionResponse.model_validate({
        "id": "cmpl-1", "object": "text_completion", "created": 0, "model": "policy",
        "choices": [{"index": 0, "text": "46", "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 6, "completion_tokens": 2, "total_tokens": 8}})


def dies(error):
    async def call():
        raise error
        yield  # an async generator, as the handle's response is

    return call


def answers():
    async def call():
        yield completion()

    return call


@pytest.mark.parametrize("losses, status, calls", [(1, 200, 2), (2, 200, 3), (3, 503, 3)])
def test_a_request_whose_engine_replica_dies_goes_to_another(monkeypatch, losses, status, calls):
    from ray.exceptions import ActorDiedError, ActorUnavailableError

    lost = [dies(ActorUnavailableError("node gone", None)), dies(ActorDiedError()), dies(ActorDiedError())]
    response, tried = run_ingress(monkeypatch, lost[:losses] + [answers()])
    assert (response.status_code, tried) == (status, calls)
    if status == 200:
        assert b'"text":"46"' in response.body
    else:
        assert b'"code":"replica_lost"' in response.body and response.headers["Retry-After"] == "1"


def test_a_stream_cut_after_its_first_chunk_is_not_sent_again(monkeypatch):
    from ray.exceptions import ActorDiedError

    async def cut():
        yield 'data: {"choices": [{"text": "4"}]}\n\n'
        raise ActorDiedError()

    tried = []
    with pytest.raises(ActorDiedError):  # the client has the first chunk; the rest cannot come from elsewhere
        run_ingress(monkeypatch, [cut, answers()], tried=tried)
    assert tried == ["completions"]


def test_an_error_from_a_live_replica_is_not_sent_again(monkeypatch):
    from ray.exceptions import ActorDiedError, RayTaskError

    # An actor the replica itself called died: the replica answers with that error and stays in rotation.
    inside = RayTaskError("completions", "traceback", ActorDiedError()).as_instanceof_cause()
    assert isinstance(inside, ActorDiedError)
    tried = []
    with pytest.raises(RayTaskError):
        run_ingress(monkeypatch, [dies(inside), answers()], tried=tried)
    assert tried == ["completions"]

    response, calls = run_ingress(monkeypatch, [dies(ValueError("messages.0.content: unknown part type")),
                                                answers()], "chat")
    assert (response.status_code, calls) == (400, 1)
