"""The model registry: every model a job writes becomes a version in MLflow's model registry, with its lineage.

    rayloop models list
    rayloop models show tiny@3

MLflow's registry, not an index of our own: registered models, versions, tags and aliases (`@prod`) are what users of
MLflow already query, and its server serves a whole cluster. A version's `source` is the model folder where the job
wrote it (a local path or `s3://...`): nothing is copied. Each version has an MLflow run holding the job's held-out
figures and its training curves (read back from the run's TensorBoard files), and tags with its lineage: the job, its
resolved config, the parent version (the model it started from), its data and seed, the git commit and Ray job id.

Where the registry lives (`registry.uri`): unset, `$MLFLOW_TRACKING_URI`, else an embedded SQLite file beside the
runs (`<storage>/mlflow.db`) when storage is a local folder or shared mount, else one on the driver's machine
(`~/.rayloop/mlflow.db`: on a cluster, the head, where `ray job submit` runs every driver). A cluster's MLflow
server (cluster.yaml starts one on the head) is `registry.uri: http://<head>:5000`.

MLflow records only where an alias points now. Promotion and rollback need its past too (who moved it, when, from
which version to which), so each move is kept as a tag of the registered model, `rayloop.alias.<alias>.<time>-<id>`.
A registration that fails (a registry that is down, an MLflow server that refuses a local source path outside its
artifact store) leaves the model written and says so in one line: the run is not lost for it.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from rayloop.config import JobError, RegistrySection
from rayloop.console import say

ALIAS_TAG = "rayloop.alias."
ENDPOINT_TAG = "rayloop.endpoint."
EXPERIMENT = "rayloop"


def default_uri(storage_path: str | None = None) -> str:
    """The registry a job or the `rayloop` command uses when none is named (see the module's docstring)."""
    from rayloop import storage

    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = storage_path or os.environ.get("RAYLOOP_STORAGE", "~/rayloop-runs")
    if storage.is_uri(root) and not root.startswith("file://"):
        folder = Path("~/.rayloop").expanduser()
    else:
        folder = Path(storage.normalize(root))
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def client(uri: str):
    """An MlflowClient on `uri`, with MLflow's start-up chatter kept out of the job's output."""
    import logging

    # MLflow retries a server that does not answer 7 times with backoff (~4 minutes); a registry that is down
    # should cost a job seconds, and say so.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    from mlflow import MlflowClient  # configures MLflow's loggers on import: quieten them after it

    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def check_reachable(uri: str) -> None:
    """Raise JobError in one line when the registry cannot be read (a server that is down, a bad URI)."""
    try:
        client(uri).search_registered_models(max_results=1)
    except Exception as exc:  # noqa: BLE001 - MLflow raises many kinds; each means the same to the user
        raise JobError(f"the model registry at {uri!r} is not reachable: {first_line(exc)}") from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------------------------
# Registering a job's model
# ---------------------------------------------------------------------------------------------------------------


def _numbers(summary: dict, prefix: str = "") -> dict[str, float]:
    """The summary's figures as MLflow metrics: numbers as they are, paired comparisons as `<name>.before` etc."""
    out = {}
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int | float):
            out[name] = float(value)
        elif isinstance(value, dict) and not prefix:
            out.update(_numbers(value, f"{name}."))
    return out


def _curves(run_dir: str) -> list[tuple[str, float, int]]:
    """(tag, value, step) of every scalar in the run's TensorBoard files: the training curves, for MLflow too."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    from rayloop import storage

    tb = storage.join(run_dir, "tensorboard")
    if not storage.is_dir(tb):
        return []
    points = []
    for path in sorted(Path(storage.local_copy(tb)).rglob("events.out.tfevents*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                number = value.simple_value if value.HasField("simple_value") else None
                if number is None and value.HasField("tensor") and value.tensor.float_val:
                    number = value.tensor.float_val[0]
                if number is not None:
                    points.append((value.tag.replace("/", "."), float(number), int(event.step)))
    return points


def git_commit() -> str:
    """The commit of the code that ran: `RAYLOOP_GIT_COMMIT` (set by `rayloop submit`, whose working-dir copy has
    no .git), else the working tree's HEAD, with `-dirty` when the tree has changes or new files (which is what
    ran), else `unknown`."""
    if os.environ.get("RAYLOOP_GIT_COMMIT"):
        return os.environ["RAYLOOP_GIT_COMMIT"]
    try:
        def git(*args):
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, check=True).stdout

        return git("rev-parse", "HEAD").strip() + ("-dirty" if git("status", "--porcelain").strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def ray_job_id() -> str:
    """The submission id of the Ray job this driver runs in (`ray job submit` passes it in the job's metadata),
    else ''."""
    try:
        return json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))["metadata"]["job_submission_id"]
    except (KeyError, TypeError, ValueError):
        return ""


def find_version(mlflow_client, model: str, source: str):
    """The version whose source is `source`: of `model` if it has one (the newest), else the newest of any
    registered model (a reward model, registered under a name of its own, starts from a policy's version)."""
    found = []
    for path in {source.rstrip("/"), source.rstrip("/") + "/"}:
        try:
            found += mlflow_client.search_model_versions("source_path='{}'".format(path.replace("'", "\\'")))
        except Exception:  # noqa: BLE001 - a registry that cannot answer: the parent stays a path
            continue
    return max(found, key=lambda v: (v.name == model, v.creation_timestamp, int(v.version)), default=None)


def _get_or_create(create, get):
    """`create()`, or `get()` when another job created it first (two first jobs may race)."""
    from mlflow.exceptions import MlflowException

    try:
        return create()
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return get()


def register(cfg, summary: dict, *, job: str, parent: str, default_model: str = "rayloop") -> str | None:
    """Register `summary["model_dir"]` as a new version of the config's registered model; return `name@version`.

    `parent`: the model the job started from (a folder, or `preset:<name>` for a model built from scratch); when a
    version has it as its source, the new version names that version as its parent."""
    import yaml

    section: RegistrySection = getattr(cfg, "registry", None) or RegistrySection()
    if not section.enabled:
        return None
    uri = section.uri or default_uri(cfg.storage.path)
    name = section.model or default_model
    mlflow = client(uri)
    source = summary["model_dir"]
    from mlflow.exceptions import MlflowException

    try:
        experiment_id = _get_or_create(lambda: mlflow.create_experiment(EXPERIMENT),
                                       lambda: mlflow.get_experiment_by_name(EXPERIMENT).experiment_id)
        commit = git_commit()
        run = mlflow.create_run(experiment_id, run_name=f"{job}:{cfg.storage.name}",
                                tags={"rayloop.job": job, "rayloop.run_dir": cfg.storage.run_dir(),
                                      "mlflow.source.git.commit": commit})
        run_id = run.info.run_id
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, 0) for k, v in _numbers(summary).items()]
        metrics += [Metric(k, v, now, step) for k, v, step in _curves(cfg.storage.run_dir())]
        for i in range(0, len(metrics), 1000):
            mlflow.log_batch(run_id, metrics=metrics[i:i + 1000])
        mlflow.set_terminated(run_id)

        _get_or_create(lambda: mlflow.create_registered_model(name, description="Models written by rayloop jobs."),
                       lambda: mlflow.get_registered_model(name))
        parent_version = None if parent.startswith("preset:") else find_version(mlflow, name, parent)
        config = cfg.model_dump(mode="json")
        data = {k: config[k] for k in ("data", "dataset", "task") if k in config}
        seeds = {f"{k}.seed": v["seed"] for k, v in config.items() if isinstance(v, dict) and "seed" in v}
        tags = {
            "job": job,
            "parent": f"{parent_version.name}@{parent_version.version}" if parent_version else parent,
            "config": yaml.safe_dump(config, sort_keys=False),
            "data": json.dumps(data, sort_keys=True),
            "seed": json.dumps(seeds, sort_keys=True),
            "git_commit": commit,
            "ray_job_id": ray_job_id(),
            "run_dir": cfg.storage.run_dir(),
        }
        version = mlflow.create_model_version(name, source=source, run_id=run_id, tags=tags,
                                              description=f"{job} run {cfg.storage.name}")
    except Exception as exc:  # noqa: BLE001 - the model is written either way; say so and go on
        say(f"{job}: warning: the model at {source} was not registered in {uri}: {first_line(exc)}")
        return None
    ref = f"{name}@{version.version}"
    say(f"{job}: registered {ref} ({source}) in {uri}")
    return ref


# ---------------------------------------------------------------------------------------------------------------
# Reading it back: references, lineage, aliases
# ---------------------------------------------------------------------------------------------------------------


def split_ref(ref: str) -> tuple[str, str]:
    """`name@3` or `name@prod` -> (name, "3" | "prod"). A bare name means its newest version (`latest`)."""
    name, _, which = ref.partition("@")
    if not name:
        raise JobError(f"{ref!r}: expected <model>@<version or alias>, e.g. rayloop@3 or rayloop@prod")
    return name, which or "latest"


def get_version(mlflow_client, ref: str):
    """The model version `ref` names; JobError in one line when the model, version or alias does not exist."""
    from mlflow.exceptions import MlflowException

    name, which = split_ref(ref)
    try:
        if which == "latest":
            versions = mlflow_client.search_model_versions(f"name='{name}'")
            if not versions:
                raise JobError(f"unknown model {name!r}: it has no versions in the registry")
            return max(versions, key=lambda v: int(v.version))
        if which.isdigit():
            return mlflow_client.get_model_version(name, which)
        return mlflow_client.get_model_version_by_alias(name, which)
    except MlflowException:
        known = [m.name for m in mlflow_client.search_registered_models()]
        if name not in known:
            raise JobError(f"unknown model {name!r} (the registry has: {', '.join(known) or 'none'})") from None
        kind = "version" if which.isdigit() else "alias"
        raise JobError(f"model {name!r} has no {kind} {which!r}") from None


def lineage(mlflow_client, ref: str) -> list:
    """The version `ref` names, then its parent, and so on back to the first (whose parent is a base model)."""
    chain, seen = [get_version(mlflow_client, ref)], set()
    while (parent := chain[-1].tags.get("parent", "")) and "@" in parent and parent not in seen:
        seen.add(parent)
        chain.append(get_version(mlflow_client, parent))
    return chain


def alias_history(mlflow_client, name: str, alias: str) -> list[dict]:
    """Every move of `name@alias`, oldest first: one tag per move (`rayloop.alias.<alias>.<time>-<id>`), so moves
    from two machines never overwrite each other's record and no tag grows without bound."""
    prefix = f"{ALIAS_TAG}{alias}."
    model = mlflow_client.get_registered_model(name)
    return [json.loads(value) for key, value in sorted(model.tags.items()) if key.startswith(prefix)]


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container user with no passwd entry
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def move_alias(mlflow_client, name: str, alias: str, version, *, action: str) -> dict:
    """Record who moves `name@alias`, when, from which version to which; then move it. The record goes first, so an
    alias never moves unrecorded."""
    import uuid

    check_alias(alias)
    model = mlflow_client.get_registered_model(name)
    previous = model.aliases.get(alias)
    record = {"who": _who(), "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "action": action,
              "from": str(previous) if previous is not None else None, "to": str(version)}
    # Ordered by the number of moves before it, not by clocks that may differ between machines.
    seq = sum(1 for key in model.tags if key.startswith(f"{ALIAS_TAG}{alias}."))
    key = f"{ALIAS_TAG}{alias}.{seq:06d}-{uuid.uuid4().hex[:8]}"
    mlflow_client.set_registered_model_tag(name, key, json.dumps(record))
    try:
        mlflow_client.set_registered_model_alias(name, alias, str(version))
    except Exception:
        mlflow_client.delete_registered_model_tag(name, key)  # no record of a move that did not happen
        raise
    return record


def check_alias(alias: str) -> str:
    """An alias (an endpoint's name) MLflow accepts and `<model>@<alias>` cannot mistake for a version."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9_-]+", alias) or alias.isdigit() or alias == "latest" \
            or re.fullmatch(r"v\d+", alias):
        raise JobError(f"endpoint name {alias!r}: use letters, digits, '-' and '_' (not only digits, not 'latest' "
                       f"or v<digits>), as MLflow's aliases")
    return alias


def served_stack(history: list[dict]) -> list[str]:
    """The versions an alias served, as a stack: `serve up` and `promote` push, `rollback` pops. Its top is the
    version served now; the one below it is where a rollback goes."""
    stack: list[str] = []
    for record in history:
        if record["action"] == "rollback":
            if stack:
                stack.pop()
        elif record["action"] == "serve up":
            stack = [record["to"]]
        else:
            stack.append(record["to"])
    return stack


def version_metrics(mlflow_client, version) -> dict[str, float]:
    """The last value of each metric of the version's run."""
    if not version.run_id:
        return {}
    return dict(mlflow_client.get_run(version.run_id).data.metrics)


def headline(metrics: dict[str, float]) -> str:
    """The held-out figures worth a line: the `after` side of each paired comparison, and eval losses."""
    keys = [k for k in metrics if k.endswith(".after")] + [k for k in ("eval_loss", "eval_accuracy") if k in metrics]
    return ", ".join(f"{k.removesuffix('.after')} {metrics[k]:.3g}" for k in keys[:4])


def describe_version(version, metrics: dict[str, float] | None = None) -> str:
    tags = version.tags
    line = f"{version.name}@{version.version}  {tags.get('job', '?'):<8} {version.source}"
    if metrics:
        line += f"  [{headline(metrics)}]"
    return line


def as_dict(version) -> dict[str, Any]:
    return {"name": version.name, "version": str(version.version), "source": version.source,
            "aliases": list(version.aliases or []), "tags": {k: v for k, v in version.tags.items() if k != "config"}}
