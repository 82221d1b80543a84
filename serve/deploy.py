"""Deploy models as an OpenAI-compatible endpoint on Ray Serve, from their folders.

    RAYLOOP_API_KEY=... python -m serve.deploy --model ~/rayloop-runs/sft-tiny
    RAYLOOP_API_KEY=... python -m serve.deploy --config serve/configs/deploy_tiny.yaml
    ray job submit --working-dir . -- python -m serve.deploy --model /shared/runs/sft-tiny --ray.address auto
    RAY_SERVE_ENABLE_HA_PROXY=1 RAYLOOP_API_KEY=... python -m serve.deploy --model ...   # HAProxy: `direct` shape

Then any OpenAI client: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key=<key>)`.
With `RAY_ADDRESS` set (a cluster, or inside `ray job submit`) it deploys, waits for the first token and returns:
the application lives on in the cluster (`serve shutdown` stops it). On a Ray it started itself it keeps serving
until Ctrl-C, since that Ray ends with the process.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from rayloop.config import RaySection, run_cli
from rayloop.console import say
from serve.config import ModelEntry, ServeAppConfig


class DeployConfig(ServeAppConfig):
    """An application config (see serve/app.py) plus where it runs. `model` is the one-folder shortcut."""

    job_name: ClassVar[str] = "serve"
    models: list[ModelEntry] = []
    model: str | None = None
    """Shortcut for one model: its folder (HF folder, checkpoint or run folder). Its id is `model_id`."""
    model_id: str | None = None
    """Id of the `model` shortcut; unset: the folder's name as given (`~/rayloop-runs/sft-tiny` -> `sft-tiny`)."""
    ray: RaySection = RaySection()
    """Where Ray runs (unset address: `RAY_ADDRESS`, else a new local cluster)."""
    host: str = "127.0.0.1"
    """Address Serve's HTTP proxy binds to. Loopback by default; `0.0.0.0` exposes it (on a cluster, on purpose)."""
    port: int = Field(default=8000, ge=1, le=65535)
    """Port of Serve's HTTP proxy."""
    proxy_location: Literal["HeadOnly", "EveryNode"] = "HeadOnly"
    """Where Serve runs HTTP proxies: on the head only, or on every node (behind a cluster's load balancer)."""
    name: str = "rayloop"
    """Serve application name (deploying again under the same name updates it in place)."""
    route_prefix: str = "/"
    """URL prefix of the application."""
    access_log: bool = True
    """Log every request in the replicas (Serve's access log, which also reaches the driver's terminal)."""
    block: bool | None = None
    """Keep the process serving until Ctrl-C. Unset: only when this process started Ray itself."""

    @model_validator(mode="before")
    @classmethod
    def _shortcut(cls, data):
        if isinstance(data, dict) and data.get("model") is not None:
            if data.get("models"):
                raise ValueError("model and models: give one model folder or a models list, not both")
            entry = {"id": data.get("model_id") or Path(str(data["model"]).rstrip("/")).name, "path": data["model"]}
            data = {**data, "models": [entry]}
        elif isinstance(data, dict) and not data.get("models"):
            raise ValueError("models: required, and missing (or give --model <folder>)")
        return data

    @model_validator(mode="after")
    def _key_is_set(self):
        from serve.guard import read_api_key

        if self.auth.enabled and read_api_key(self.auth) is None:
            raise ValueError(f"auth: enabled, but no API key is set: export {self.auth.api_key_env} or set "
                             f"auth.api_key_file (auth.enabled=false opens the endpoint to anyone)")
        return self

    def app_args(self) -> ServeAppConfig:
        fields = set(ServeAppConfig.model_fields)
        return ServeAppConfig.model_validate(self.model_dump(include=fields))


def first_token_seconds(base_url: str, key: str | None, model: str, timeout_s: float = 600) -> float:
    """Seconds until the endpoint streams its first token for `model` (retrying while replicas start)."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=key or "unused", max_retries=0, timeout=60)
    start, last_error = time.monotonic(), None
    while time.monotonic() - start < timeout_s:
        try:
            for _ in client.completions.create(model=model, prompt="1+1=", max_tokens=1, stream=True):
                return time.monotonic() - start
        except Exception as exc:  # noqa: BLE001 - replicas still starting: 503s, connection refused
            last_error = exc
            time.sleep(1)
    raise TimeoutError(f"no token from {model} within {timeout_s:.0f} s: {last_error}")


def main(cfg: DeployConfig) -> dict:
    import os

    from ray import serve

    from rayloop.cluster import init_ray
    from serve.app import build_app
    from serve.guard import read_api_key

    args = cfg.app_args()
    key = read_api_key(args.auth) if args.auth.enabled else None
    started_here = not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))

    t0 = time.monotonic()
    init_ray(cfg.ray)  # first: building the app would otherwise start a default-sized Ray on its own
    app = build_app(args)
    serve.start(http_options={"host": cfg.host, "port": cfg.port}, proxy_location=cfg.proxy_location)
    serve.run(app, name=cfg.name, route_prefix=cfg.route_prefix, blocking=False,
              logging_config={"enable_access_log": cfg.access_log})
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    base_url = f"http://{host}:{cfg.port}{cfg.route_prefix.rstrip('/')}/v1"
    ready = first_token_seconds(base_url, key, args.models[0].id)
    summary = {"base_url": base_url, "models": [m.id for m in args.models], "auth": args.auth.enabled,
               "deploy_to_first_token_s": round(time.monotonic() - t0, 1), "first_token_wait_s": round(ready, 1)}
    say(f"serve: {json.dumps(summary)}")

    if cfg.block if cfg.block is not None else started_here:
        say("serve: serving until Ctrl-C")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            serve.shutdown()
    return summary


if __name__ == "__main__":
    from serve import deploy

    run_cli(deploy.DeployConfig, deploy.main)
