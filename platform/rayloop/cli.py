"""The `rayloop` command: jobs through Ray's job API, models in the registry, endpoints on Ray Serve.

    rayloop submit sft --config jobs/configs/sft_tiny.yaml --train.steps=100   # = ray job submit ... python -m jobs.sft
    rayloop status|logs|stop <job-id>
    rayloop models list | rayloop models show rayloop@3
    rayloop serve up --endpoint prod --model rayloop@3 [--config serve/configs/deploy_tiny.yaml] [--port=8000 ...]
    rayloop serve status|down --endpoint prod
    rayloop promote rayloop@4 --endpoint prod
    rayloop rollback --endpoint prod

Job commands talk to the job API (`--address`, else `RAY_API_SERVER_ADDRESS` / `RAY_ADDRESS`, as `ray job` does);
serve commands join the cluster as a driver (`RAY_ADDRESS`, else `auto`: the Ray started on this machine with
`ray start`). Ray's token reaches both as it reaches Ray's own CLI (`RAY_AUTH_TOKEN` or ~/.ray/auth_token). The
registry is `--registry`, else rayloop's default (rayloop/registry.py). Every failure is one line and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from rayloop.config import ConfigError, JobError
from rayloop.registry import first_line

JOBS = ("pretrain", "sft", "dpo", "reward", "grpo", "pipeline")


# ---------------------------------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------------------------------


def job_client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 - connection refused, 401 without the token, a bad address
        where = (address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
                 or "http://127.0.0.1:8265")
        raise JobError(f"Ray's job API at {where} refused or did not answer: {first_line(exc)}") from None


def submit_runtime_env(working_dir: Path) -> dict:
    """The job's runtime environment: the working dir, the rayloop source (as on this machine, so the cluster runs
    the code that was submitted) and the git commit that ties the registered model to it."""
    import jobs
    import serve
    from rayloop.cluster import PACKAGE_DIR, REPO_ROOT
    from rayloop.registry import git_commit

    env: dict = {"working_dir": str(working_dir), "py_modules": [str(PACKAGE_DIR)]}
    if working_dir == REPO_ROOT:
        env["excludes"] = ["platform/", "bench/results/", "tests/", ".venv/", ".git/"]
    for module in (jobs, serve):
        folder = Path(module.__file__).resolve().parent
        if folder.parent != working_dir:
            env["py_modules"].append(str(folder))
    here = os.getcwd()
    try:
        os.chdir(working_dir)
        commit = git_commit()
    finally:
        os.chdir(here)
    # Storage and registry come from the cluster (cluster.yaml sets them where Ray starts), not from this shell:
    # `--env` passes them on purpose.
    # `ray job stop` gives a job 3 s after SIGTERM by default; a job in s3 copies its log there on the way out.
    env["env_vars"] = {"RAYLOOP_GIT_COMMIT": commit, "RAY_JOB_STOP_WAIT_TIME_S": "30"}
    return env


def cmd_submit(args, job_args: list[str]) -> int:
    from rayloop.config import VERBOSE_FLAG, parse_args

    if args.job not in JOBS:
        raise ConfigError(f"unknown job {args.job!r} (jobs: {', '.join(JOBS)})")
    # The overrides' syntax, here; the job checks its whole config before it asks for resources.
    parse_args([a for a in job_args if a != VERBOSE_FLAG])
    working_dir = Path(args.working_dir).resolve()
    if not working_dir.is_dir():
        raise ConfigError(f"--working-dir: no such folder {args.working_dir!r}")
    runtime_env = submit_runtime_env(working_dir)
    for pair in args.env:
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise ConfigError(f"--env: expected KEY=VALUE, got {pair!r}")
        runtime_env["env_vars"][key] = value
    entrypoint = shlex.join(["python", "-m", f"jobs.{args.job}", *job_args])  # the cluster's python, as ray job submit
    client = job_client(args.address)
    try:
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    except Exception as exc:  # noqa: BLE001 - the job API refused it (a runtime env it cannot build, no token)
        raise JobError(f"the job API refused the job: {first_line(exc)}") from None
    print(f"submitted {job_id}: {entrypoint}", flush=True)
    if args.no_wait:
        return 0
    return _follow(client, job_id)


def _follow(client, job_id: str) -> int:
    import asyncio

    async def tail():
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(tail())
    status = str(client.get_job_status(job_id).value)
    print(f"job {job_id}: {status}", flush=True)
    return 0 if status == "SUCCEEDED" else 1


def cmd_job(args, _) -> int:
    client = job_client(args.address)
    try:
        if args.command == "status":
            info = client.get_job_info(args.job_id)
            print(f"{args.job_id}: {info.status.value}  {info.entrypoint}" + (f"  ({info.message})" if info.message
                                                                              else ""))
        elif args.command == "logs":
            if args.follow:
                return _follow(client, args.job_id)
            print(client.get_job_logs(args.job_id), end="")
        else:
            stopped = client.stop_job(args.job_id)
            print(f"{args.job_id}: {'stopping' if stopped else 'not running'}")
    except RuntimeError as exc:  # the SDK's answer to an unknown id
        raise JobError(first_line(exc)) from None
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------


def _registry(args):
    from rayloop import registry

    uri = args.registry or registry.default_uri()
    registry.check_reachable(uri)
    return registry, registry.client(uri), uri


def cmd_models(args, _) -> int:
    registry, mlflow, uri = _registry(args)
    if args.command == "list":
        models = mlflow.search_registered_models()
        if not models:
            print(f"no models in {uri}")
        for model in models:
            aliases = ", ".join(f"@{a} -> {v}" for a, v in sorted(model.aliases.items())) or "no aliases"
            print(f"{model.name}  ({aliases})")
            for version in sorted(mlflow.search_model_versions(f"name='{model.name}'"), key=lambda v: int(v.version)):
                print("  " + registry.describe_version(version, registry.version_metrics(mlflow, version)))
        return 0
    chain = registry.lineage(mlflow, args.ref)
    version = chain[0]
    if args.json:
        print(json.dumps([registry.as_dict(v) for v in chain], indent=2))
        return 0
    tags = version.tags
    print(registry.describe_version(version, registry.version_metrics(mlflow, version)))
    for key in ("git_commit", "ray_job_id", "run_dir", "seed", "data"):
        print(f"  {key}: {tags.get(key) or '-'}")
    if version.aliases:
        print(f"  aliases: {', '.join('@' + a for a in version.aliases)}")
    print("  lineage:")
    for depth, item in enumerate(chain):
        print(f"    {'  ' * depth}{registry.describe_version(item)}")
    print(f"    {'  ' * len(chain)}base: {chain[-1].tags.get('parent') or '-'}")
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Endpoints
# ---------------------------------------------------------------------------------------------------------------


def _join_ray(args) -> None:
    from rayloop.cluster import init_ray
    from rayloop.config import RaySection

    init_ray(RaySection(address=args.ray_address or os.environ.get("RAY_ADDRESS") or "auto"))


def cmd_serve(args, overrides: list[str]) -> int:
    from serve import endpoint

    if args.command == "down":  # Serve alone: the registry keeps the alias and its history
        _join_ray(args)
        print(f"endpoint {args.endpoint}: " + ("deleted" if endpoint.down(args.endpoint) else "was not running"))
        return 0
    registry, _, uri = _registry(args)
    if args.command == "up":
        from rayloop.config import load_config
        from serve.deploy import DeployConfig

        if not args.model:
            raise ConfigError("--model: required, e.g. --model rayloop@3")
        version = registry.get_version(registry.client(uri), args.model)
        argv = (["--config", args.config] if args.config else []) + overrides + [f"--model={version.source}"]
        cfg = load_config(DeployConfig, argv)  # the API key and every setting checked before Ray
        _join_ray(args)
        result = endpoint.up(cfg, args.endpoint, args.model, uri)
        print(f"endpoint {args.endpoint}: serving {result['model']}@{result['to']} at {result['base_url']}")
        return 0
    _join_ray(args)
    if args.command == "status":
        print(json.dumps(endpoint.status(args.endpoint, uri)))
    return 0


def cmd_move(args, _) -> int:
    from serve import endpoint

    _, _, uri = _registry(args)
    _join_ray(args)
    result = endpoint.move(args.endpoint, uri, ref=getattr(args, "ref", None))
    print(f"endpoint {args.endpoint}: {result['action']} {result['model']}@{result['from']} -> "
          f"{result['model']}@{result['to']} in {result['seconds']} s")
    return 0


# ---------------------------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})


def parser() -> argparse.ArgumentParser:
    # No abbreviations: a job's own options pass through and must never be taken for a prefix of ours.
    top = argparse.ArgumentParser(prog="rayloop", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    sub = top.add_subparsers(dest="group", required=True, parser_class=_Parser)

    def with_registry(p):
        p.add_argument("--registry", help="MLflow tracking/registry URI (default: see rayloop/registry.py)")
        return p

    def with_ray(p):
        p.add_argument("--ray-address", help="cluster to join as a driver (default: RAY_ADDRESS, else auto)")
        return with_registry(p)

    p = sub.add_parser("submit", help="submit a job: python -m jobs.<job> [--config ...] [--a.b=value ...]")
    p.add_argument("job", help=f"one of {', '.join(JOBS)}")
    p.add_argument("--address", help="Ray's job API (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS)")
    p.add_argument("--working-dir", default=".", help="folder shipped as the job's working dir (default: .)")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="an environment variable of the job (repeatable)")
    p.set_defaults(run=cmd_submit, passthrough=True)
    for name in ("status", "logs", "stop"):
        p = sub.add_parser(name, help=f"{name} of a submitted job")
        p.add_argument("job_id")
        p.add_argument("--address", help="Ray's job API")
        if name == "logs":
            p.add_argument("--follow", "-f", action="store_true")
        p.set_defaults(run=cmd_job, command=name)

    models = sub.add_parser("models", help="the registry's models").add_subparsers(dest="command", required=True,
                                                                                   parser_class=_Parser)
    with_registry(models.add_parser("list", help="every model and version")).set_defaults(run=cmd_models)
    p = with_registry(models.add_parser("show", help="one version, its figures and lineage"))
    p.add_argument("ref", help="<model>@<version or alias>")
    p.add_argument("--json", action="store_true")
    p.set_defaults(run=cmd_models)

    serve = sub.add_parser("serve", help="endpoints on Ray Serve").add_subparsers(dest="command", required=True,
                                                                                  parser_class=_Parser)
    p = with_ray(serve.add_parser("up", help="deploy a registered version as an endpoint"))
    p.add_argument("--endpoint", required=True)
    p.add_argument("--model", help="<model>@<version or alias>")
    p.add_argument("--config", help="serve.deploy config (YAML); further --a.b=value overrides follow")
    p.set_defaults(run=cmd_serve, passthrough=True)
    for name in ("status", "down"):
        p = with_ray(serve.add_parser(name))
        p.add_argument("--endpoint", required=True)
        p.set_defaults(run=cmd_serve)

    p = with_ray(sub.add_parser("promote", help="move an endpoint to a version, with no request dropped"))
    p.add_argument("ref", help="<model>@<version>")
    p.add_argument("--endpoint", required=True)
    p.set_defaults(run=cmd_move)
    p = with_ray(sub.add_parser("rollback", help="move an endpoint back to its previous version"))
    p.add_argument("--endpoint", required=True)
    p.set_defaults(run=cmd_move)
    return top


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, rest = parser().parse_known_args(argv)
    if rest and not getattr(args, "passthrough", False):
        print(f"rayloop: unexpected arguments {' '.join(rest)}", file=sys.stderr)
        return 2
    try:
        return args.run(args, rest)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except JobError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
