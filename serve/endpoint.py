"""Endpoints: a live Serve application serving one registered model at the version its alias names.

    rayloop serve up --endpoint prod --model rayloop@2     # deploy; alias rayloop@prod -> 2
    rayloop promote rayloop@3 --endpoint prod               # rolling update to 3; alias -> 3
    rayloop rollback --endpoint prod                        # back to 2, the same way

An endpoint is named after the alias it follows: the Serve application `prod` serves the version that `<model>@prod`
names, as model id `<model>` (clients ask for `rayloop`; every response names the version that answered). Its
deploy settings (serve/deploy.py's config, less the model folder) are kept with the registered model, as the tag
`rayloop.endpoint.<name>`, so a promotion from any machine deploys the same application with only the version
changed. The alias moves after the new version answers, never before, and a version that fails to start leaves the
endpoint and the alias where they were.
"""

from __future__ import annotations

import json
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
    for model in mlflow_client.search_registered_models():
        if (settings := model.tags.get(registry.ENDPOINT_TAG + endpoint)) is not None:
            return model.name, json.loads(settings)
    raise JobError(f"no endpoint {endpoint!r} in the registry (start one with `rayloop serve up --endpoint "
                   f"{endpoint} --model <model>@<version>`)")


def app_status(endpoint: str) -> str | None:
    """Serve's status of the application (`RUNNING`, `DEPLOYING`, ...), None when there is none."""
    from ray import serve

    app = serve.status().applications.get(endpoint)
    return str(getattr(app.status, "value", app.status)) if app else None


def _deploy(cfg: DeployConfig, endpoint: str) -> None:
    from ray import serve

    from serve.app import build_app

    serve.start(http_options={"host": cfg.host, "port": cfg.port}, proxy_location=cfg.proxy_location)
    # Waits until the application runs: every replica of the new version started, the old ones stopping.
    serve.run(build_app(cfg.app_args()), name=endpoint, route_prefix=cfg.route_prefix, blocking=False)


def settings_for(version, settings: dict) -> DeployConfig:
    """The endpoint's deploy config serving `version` (folder checked first)."""
    model = {**settings.get("models", [{}])[0], "id": version.name, "path": check_loads(version),
             "version": f"{version.name}@{version.version}"}
    try:
        return validate(DeployConfig, {**settings, "models": [model], "model": None})
    except ConfigError as exc:
        raise JobError(f"endpoint settings: {exc}") from None


def stored_settings(cfg: DeployConfig) -> dict:
    """What is kept with the registered model: the deploy config less what belongs to one version."""
    data = cfg.model_dump(mode="json", exclude={"model", "model_id", "ray", "block"})
    for model in data["models"]:
        for key in ("id", "path", "version"):
            model.pop(key, None)
    return data


def base_url(settings: dict) -> str:
    """The endpoint's OpenAI base URL, from its stored settings."""
    host, port = settings.get("host", "127.0.0.1"), settings.get("port", 8000)
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{host}:{port}{settings.get('route_prefix', '/').rstrip('/')}/v1"


def up(cfg: DeployConfig, endpoint: str, ref: str, uri: str) -> dict:
    """Deploy `ref` as the endpoint (a new one, or the same settings again) and point the alias at it."""
    from serve.deploy import first_token_seconds
    from serve.guard import read_api_key

    mlflow = registry.client(uri)
    version = registry.get_version(mlflow, ref)
    cfg = settings_for(version, stored_settings(cfg))
    _deploy(cfg, endpoint)
    key = read_api_key(cfg.auth) if cfg.auth.enabled else None
    settings = stored_settings(cfg)
    first_token_seconds(base_url(settings), key, version.name, timeout_s=600)
    mlflow.set_registered_model_tag(version.name, registry.ENDPOINT_TAG + endpoint, json.dumps(settings))
    record = registry.move_alias(mlflow, version.name, endpoint, version.version, action="serve up")
    return {"endpoint": endpoint, "base_url": base_url(settings), "model": version.name, **record}


def move(endpoint: str, uri: str, *, ref: str | None = None, action: str = "promote") -> dict:
    """Promote `ref` on a running endpoint, or (`ref` None) roll it back to the version before the current one.

    Checks, before anything changes: the endpoint exists and runs, the version exists and its folder holds a model.
    Then a rolling update (new replicas before old ones stop); the alias moves once it is done. If the new version
    fails to start, the endpoint is deployed back at its current version and the alias stays."""
    mlflow = registry.client(uri)
    name, settings = find_endpoint(mlflow, endpoint)
    if (status := app_status(endpoint)) is None:
        raise JobError(f"endpoint {endpoint!r} is not running (Serve has no application {endpoint!r}); start it with "
                       f"`rayloop serve up --endpoint {endpoint} --model {name}@{endpoint}`")
    current = registry.get_version(mlflow, f"{name}@{endpoint}")
    if ref is None:
        history = registry.alias_history(mlflow, name, endpoint)
        previous = next((r["from"] for r in reversed(history) if r["to"] == str(current.version) and r["from"]), None)
        if previous is None:
            raise JobError(f"endpoint {endpoint!r} has no earlier version to roll back to (it serves {name}@"
                           f"{current.version} since `{history[-1]['action'] if history else 'serve up'}`)")
        ref, action = f"{name}@{previous}", "rollback"
    target = registry.get_version(mlflow, ref)
    if target.name != name:
        raise JobError(f"endpoint {endpoint!r} serves model {name!r}, not {target.name!r}")
    cfg = settings_for(target, settings)  # checks the folder
    if status != APP_HEALTHY:
        raise JobError(f"endpoint {endpoint!r} is {status}, not RUNNING: wait for it (`rayloop serve status`)")
    started = time.monotonic()
    try:
        _deploy(cfg, endpoint)
    except Exception as exc:  # noqa: BLE001 - Serve says why the new replicas did not start; restore the old
        _deploy(settings_for(current, settings), endpoint)
        raise JobError(f"{target.name}@{target.version} did not start ({registry.first_line(exc)}); endpoint "
                       f"{endpoint!r} still serves {name}@{current.version}") from None
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
