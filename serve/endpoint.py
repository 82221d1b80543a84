"""Endpoints: a live Serve application serving one registered model at the version its alias names.

    rayloop serve up --endpoint prod --model rayloop@2     # deploy; alias rayloop@prod -> 2
    rayloop promote rayloop@3 --endpoint prod               # rolling update to 3; alias -> 3
    rayloop rollback --endpoint prod                        # back to 2, the same way

An endpoint is named after the alias it follows: the Serve application `prod` serves the version that `<model>@prod`
names, as model id `<model>` (clients ask for `rayloop`; every response names the version that answered). Its
deploy settings (serve/deploy.py's config, less the model folder, with the HTTP shape resolved and the API key's
digest) are kept with the registered model, as the tag `rayloop.endpoint.<name>`, so a promotion from any machine
deploys the same application with only the version changed, and one whose API key differs is refused. The alias
moves after the new version answers, never before; a version that fails to start leaves the alias where it was.
"""

from __future__ import annotations

import json
import threading
import time

from rayloop import registry, storage
from rayloop.config import ConfigError, JobError, validate
from serve.deploy import DeployConfig

APP_HEALTHY = "RUNNING"


def check_loads(version) -> str:
    """The version's model folder, after checking that it still holds a model: JobError naming it if not."""
    source = version.source
    if not storage.is_file(storage.join(source, "config.json")):
        raise JobError(f"{version.name}@{version.version}: its model folder {source} is gone (no config.json there)")
    weights = [f for f in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
               if storage.is_file(storage.join(source, f))]
    if not weights:
        raise JobError(f"{version.name}@{version.version}: {source} holds no weights")
    return source


def find_endpoint(mlflow_client, endpoint: str) -> tuple[str, dict]:
    """(registered model, stored deploy settings) of an endpoint; JobError if no model has it."""
    tag = registry.ENDPOINT_TAG + endpoint
    owners = [m for m in mlflow_client.search_registered_models(max_results=1000) if tag in m.tags]
    if not owners:
        raise JobError(f"no endpoint {endpoint!r} in the registry (start one with `rayloop serve up --endpoint "
                       f"{endpoint} --model <model>@<version>`)")
    if len(owners) > 1:
        raise JobError(f"endpoint {endpoint!r} is claimed by models {', '.join(m.name for m in owners)}: remove the "
                       f"tag {tag!r} from all but one")
    return owners[0].name, json.loads(owners[0].tags[tag])


def app_status(endpoint: str) -> str | None:
    """Serve's status of the application (`RUNNING`, `DEPLOYING`, ...), None when there is none."""
    from ray import serve

    app = serve.status().applications.get(endpoint)
    return str(getattr(app.status, "value", app.status)) if app else None


def _deploy(cfg: DeployConfig, endpoint: str, timeout_s: float) -> None:
    """Deploy and wait until the application runs (every replica of the new version started, the old ones
    stopping). serve.run waits without a deadline: with no room for the surge replicas it would wait forever, so it
    waits here in a thread, `timeout_s` at most."""
    from ray import serve

    from serve.app import build_app

    serve.start(http_options={"host": cfg.host, "port": cfg.port}, proxy_location=cfg.proxy_location)
    app, outcome = build_app(cfg.app_args()), {}

    def run():
        try:
            serve.run(app, name=endpoint, route_prefix=cfg.route_prefix, blocking=False,
                      logging_config={"enable_access_log": cfg.access_log})
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"not running after {timeout_s:.0f} s (no room for the new replicas? Serve keeps the old "
                           f"ones serving until the new ones start: see `rayloop serve status`)")
    if "error" in outcome:
        raise outcome["error"]


def settings_for(version, settings: dict) -> DeployConfig:
    """The endpoint's deploy config serving `version` (folder checked first)."""
    model = {**settings.get("models", [{}])[0], "id": version.name, "path": check_loads(version),
             "version": f"{version.name}@{version.version}"}
    data = {k: v for k, v in settings.items() if k != "key_check"}
    try:
        return validate(DeployConfig, {**data, "models": [model], "model": None})
    except ConfigError as exc:
        raise JobError(f"endpoint settings: {exc}") from None


def stored_settings(cfg: DeployConfig) -> dict:
    """What is kept with the registered model: the deploy config less what belongs to one version, with the HTTP
    shape as resolved where it was first deployed (`auto` depends on the deploying shell's HAProxy setting) and the
    API key's digest (never the key)."""
    from serve.guard import read_api_key

    data = cfg.model_dump(mode="json", exclude={"model", "model_id", "ray", "block"})
    data["ingress"] = "direct" if cfg.app_args().direct_ingress() else "openai"
    for model in data["models"]:
        for key in ("id", "path", "version"):
            model.pop(key, None)
    if cfg.auth.enabled:
        data["key_check"] = key_check(read_api_key(cfg.auth))
    return data


def key_check(key: str, salt: str | None = None) -> dict:
    """A salted HMAC of the API key, kept with the endpoint's settings: enough to tell the same key again, of no use
    for guessing it offline from the registry."""
    import hashlib
    import hmac
    import secrets

    salt = salt or secrets.token_hex(16)
    return {"salt": salt, "hmac": hmac.new(salt.encode(), key.encode(), hashlib.sha256).hexdigest()}


def _same_key(cfg: DeployConfig, settings: dict, endpoint: str) -> None:
    from serve.guard import read_api_key

    stored = settings.get("key_check")
    if cfg.auth.enabled and stored and key_check(read_api_key(cfg.auth), stored["salt"]) != stored:
        raise JobError(f"the API key here ({cfg.auth.api_key_env} or auth.api_key_file) is not the one endpoint "
                       f"{endpoint!r} was deployed with; deploying with it would lock out every client")


def base_url(settings: dict) -> str:
    """The endpoint's OpenAI base URL, from its stored settings."""
    host, port = settings.get("host", "127.0.0.1"), settings.get("port", 8000)
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{host}:{port}{settings.get('route_prefix', '/').rstrip('/')}/v1"


def up(cfg: DeployConfig, endpoint: str, ref: str, uri: str, timeout_s: float = 900) -> dict:
    """Deploy `ref` as the endpoint (a new one, or the same settings again) and point the alias at it."""
    from serve.deploy import first_token_seconds
    from serve.guard import read_api_key

    registry.check_alias(endpoint)
    mlflow = registry.client(uri)
    version = registry.get_version(mlflow, ref)
    cfg = settings_for(version, stored_settings(cfg))
    settings = stored_settings(cfg)
    existed = app_status(endpoint) is not None
    try:
        _deploy(cfg, endpoint, timeout_s)
        first_token_seconds(base_url(settings), read_api_key(cfg.auth) if cfg.auth.enabled else None, version.name,
                            timeout_s=timeout_s)
    except Exception as exc:  # noqa: BLE001 - a new endpoint that did not start is removed, not left half-up
        if not existed:
            down(endpoint)
        state = "left as Serve has it (see `rayloop serve status`)" if existed else "removed"
        raise JobError(f"endpoint {endpoint!r}: {version.name}@{version.version} did not start "
                       f"({registry.first_line(exc)}); the endpoint is {state} and the alias did not move") from None
    for model in mlflow.search_registered_models(max_results=1000):  # the endpoint follows one model only
        if model.name != version.name and registry.ENDPOINT_TAG + endpoint in model.tags:
            mlflow.delete_registered_model_tag(model.name, registry.ENDPOINT_TAG + endpoint)
    mlflow.set_registered_model_tag(version.name, registry.ENDPOINT_TAG + endpoint, json.dumps(settings))
    record = registry.move_alias(mlflow, version.name, endpoint, version.version, action="serve up")
    return {"endpoint": endpoint, "base_url": base_url(settings), "model": version.name, **record}


def move(endpoint: str, uri: str, *, ref: str | None = None, timeout_s: float = 900) -> dict:
    """Promote `ref` on a running endpoint, or (`ref` None) roll it back to the version it served before.

    Checks, before anything changes: the endpoint exists and runs, the version exists, is not the one served, and
    its folder holds a model; the API key here is the endpoint's. Then a rolling update (new replicas before old
    ones stop); the alias moves once it is done. If the new version fails to start, the endpoint is deployed back
    at its current version and the alias stays."""
    mlflow = registry.client(uri)
    name, settings = find_endpoint(mlflow, endpoint)
    if (status := app_status(endpoint)) is None:
        raise JobError(f"endpoint {endpoint!r} is not running (Serve has no application {endpoint!r}); start it with "
                       f"`rayloop serve up --endpoint {endpoint} --model {name}@{endpoint}`")
    current = registry.get_version(mlflow, f"{name}@{endpoint}")
    action = "promote"
    if ref is None:
        stack = registry.served_stack(registry.alias_history(mlflow, name, endpoint))
        if len(stack) < 2:
            raise JobError(f"endpoint {endpoint!r} has no earlier version to roll back to (it serves "
                           f"{name}@{current.version})")
        ref, action = f"{name}@{stack[-2]}", "rollback"
    target = registry.get_version(mlflow, ref)
    if target.name != name:
        raise JobError(f"endpoint {endpoint!r} serves model {name!r}, not {target.name!r}")
    if str(target.version) == str(current.version):
        raise JobError(f"endpoint {endpoint!r} already serves {name}@{current.version}")
    cfg = settings_for(target, settings)  # checks the folder
    _same_key(cfg, settings, endpoint)
    if status != APP_HEALTHY:
        raise JobError(f"endpoint {endpoint!r} is {status}, not RUNNING: wait for it (`rayloop serve status`)")
    started = time.monotonic()
    try:
        _deploy(cfg, endpoint, timeout_s)
    except Exception as exc:  # noqa: BLE001 - it did not start, or not in time: Serve's target goes back to the old
        reason = registry.first_line(exc)
        try:
            _deploy(settings_for(current, settings), endpoint, timeout_s)
            restored = f"endpoint {endpoint!r} serves {name}@{current.version} again"
        except Exception as again:  # noqa: BLE001 - both are worth saying
            restored = f"restoring {name}@{current.version} failed too: {registry.first_line(again)}"
        raise JobError(f"{target.name}@{target.version} did not start ({reason}); {restored}") from None
    record = registry.move_alias(mlflow, name, endpoint, target.version, action=action)
    return {"endpoint": endpoint, "model": name, "seconds": round(time.monotonic() - started, 1), **record}


def status(endpoint: str, uri: str) -> dict:
    mlflow = registry.client(uri)
    name, settings = find_endpoint(mlflow, endpoint)
    version = registry.get_version(mlflow, f"{name}@{endpoint}")
    return {"endpoint": endpoint, "status": app_status(endpoint) or "NOT RUNNING", "model": f"{name}@{endpoint}",
            "version": f"{name}@{version.version}", "source": version.source, "base_url": base_url(settings)}


def down(endpoint: str) -> bool:
    """Delete the endpoint's Serve application (the alias and its history stay in the registry)."""
    from ray import serve

    if app_status(endpoint) is None:
        return False
    serve.delete(endpoint)
    return True
