"""One way to start or join Ray, for every job.

- `RAY_ADDRESS` (or `ray.address` in the config) set: join that cluster. Inside `ray job submit` this is how the
  driver finds its head.
- Otherwise: start a new local cluster sized so that Ray Train and Ray Serve both schedule on a 2-core laptop.

Either way the live `rayloop` source travels to every worker as a `py_modules` entry of the runtime environment,
merged by Ray with the job's own (`--working-dir .` from the checkout brings `jobs/` and `serve/`; from a user's
own folder they travel as `py_modules` too). An edit made after `pip install -e .` is what the workers run, on this
machine and on a cluster whose nodes never installed rayloop.
Token authentication is Ray's default in 2.60 and is left on: nothing here sets RAY_AUTH_MODE.
Serve's HAProxy (`RAY_SERVE_ENABLE_HA_PROXY=1`, read where Ray starts) is the caller's choice; cluster.yaml and the
integration tests turn it on. A local Ray started with it gets one HAProxy thread per two cores.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import rayloop
from rayloop.config import JobError, RaySection

log = logging.getLogger(__name__)

PACKAGE_DIR = Path(rayloop.__file__).resolve().parent
# The repository root when rayloop runs from a checkout (platform/rayloop): jobs/ and serve/ live there.
REPO_ROOT = PACKAGE_DIR.parent.parent if PACKAGE_DIR.parent.name == "platform" else None


def runtime_env(joining: bool = False) -> dict:
    """What every Ray worker needs: the live code and the folder the job runs from.

    rayloop always travels as a `py_modules` entry; so do jobs/ and serve/ when the job runs from a folder that
    does not hold them (a user's own project: data, reward modules, configs). A job that starts its own local Ray
    ships the folder it runs from as the working dir, as `--working-dir .` would, so relative paths and the user's
    modules resolve the same way on every worker (from the checkout: without platform/, tests/ and bench results,
    which travel otherwise or are not needed). A job that joins a running cluster (`joining`) ships no folder of
    this machine's: `ray job submit --working-dir` is the way to send one there."""
    import json

    job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}").get("runtime_env") or {}
    if job_env.get("py_modules"):
        # Submitted with the source already (`rayloop submit`): Ray refuses a driver's py_modules beside the job's.
        return {}
    env: dict = {"py_modules": [str(PACKAGE_DIR)]}
    here = Path.cwd().resolve()
    in_submitted_job = bool(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"))  # the job brings its working dir
    # Never a home folder: it holds the runs and the caches.
    ships_here = not in_submitted_job and not joining and here != Path.home().resolve()
    if ships_here:
        env["working_dir"] = str(here)
        if here == REPO_ROOT:
            env["excludes"] = ["platform/", "bench/results/", "tests/"]
    for name in ("jobs", "serve"):
        module = sys.modules.get(name)
        folder = Path(module.__file__).resolve().parent if module and getattr(module, "__file__", None) else None
        if folder is not None and not ((in_submitted_job or ships_here) and folder.parent == here):
            env["py_modules"].append(str(folder))
    return env


def local_num_cpus(requested: int | None) -> int:
    # Logical CPUs, not cores: with only 2 the Serve ingress never schedules beside an engine (STACK.md trap 5).
    return requested or max(8, os.cpu_count() or 1)


def check_reachable(address: str, source: str = "RAY_ADDRESS", timeout_s: float = 5.0) -> None:
    """Fail in seconds, in one line, when the cluster's port does not answer: ray.init retries its GCS connection
    for over a minute and then raises a traceback. Addresses without a port (`auto`) are left to ray.init."""
    import socket

    scheme, _, rest = address.rpartition("://")
    if scheme in ("http", "https"):
        raise JobError(f"{source}={address!r} is the job API's address (for `ray job submit`); a job joins a cluster at "
                       f"its GCS address, host:6379 (or ray://host:10001), or unset {source} to run on a local Ray")
    host, _, port = rest.rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        return
    host = host.strip("[]")
    if not scheme and host in ("localhost", "127.0.0.1", "::1"):
        import ray.util

        # ray.init joins a loopback address at this node's IP, where the head's GCS listens (not on loopback).
        host = ray.util.get_node_ip_address()
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise JobError(f"Ray is not reachable at {address!r} ({exc.strerror or exc}): start the cluster, or unset "
                       f"{source} to run on a local Ray") from None


def init_ray(cfg: RaySection | None = None):
    """Join the configured cluster or start a local one; idempotent. Returns ray's context."""
    import ray

    cfg = cfg or RaySection()
    if ray.is_initialized():
        return ray.get_runtime_context()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining Ray cluster at %s", address)
        check_reachable(address, "ray.address" if cfg.address else "RAY_ADDRESS")
        try:
            return ray.init(address=address, runtime_env=runtime_env(joining=True), logging_level=logging.WARNING)
        except ConnectionError as exc:  # e.g. `auto` with no cluster here, or a driver on a machine without a node
            cause = exc.__cause__ or exc
            raise JobError(f"could not join Ray at {address!r}: {str(cause).strip().splitlines()[0]} (from another "
                           f"machine, submit the job with `ray job submit` instead)") from None
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        # HAProxy's default is 4 threads. On 2 cores they cost 0.29 CPU-s per 200 streamed requests, one thread
        # 0.13-0.16 (bench/serve.py), CPU the engine gets instead. Ray reads it where it starts.
        os.environ.setdefault("RAY_SERVE_HAPROXY_NBTHREAD", str(max(1, min(4, (os.cpu_count() or 2) // 2))))
    return ray.init(
        # "local": always a new cluster. Without it ray.init() joins whatever /tmp/ray/ray_current_cluster names,
        # even a head that has since died. A running cluster is joined on purpose, with RAY_ADDRESS=auto.
        address="local",
        num_cpus=local_num_cpus(cfg.num_cpus),
        object_store_memory=cfg.object_store_memory_mb * 1024 * 1024,
        # The dashboard serves Ray's state API (Train's clean-up polls it) and the job API; loopback only.
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        runtime_env=runtime_env(),
        logging_level=logging.WARNING,
    )
