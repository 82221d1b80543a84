import contextlib
import socket
from pathlib import Path

from rayloop.cluster import PACKAGE_DIR, REPO_ROOT, local_num_cpus, runtime_env


def test_runtime_env_ships_live_source(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.chdir(REPO_ROOT)
    env = runtime_env()
    assert env["py_modules"] == [str(PACKAGE_DIR)]
    assert env["working_dir"] == str(REPO_ROOT) and (REPO_ROOT / "jobs" / "pretrain.py").is_file()


def test_a_local_run_from_a_users_folder_ships_that_folder_and_rayloops_jobs(monkeypatch, tmp_path):
    import jobs  # noqa: F401 - imported, as `python -m jobs.grpo` has by then

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.chdir(tmp_path)
    env = runtime_env()
    assert env["working_dir"] == str(tmp_path.resolve()) and "excludes" not in env
    assert str(REPO_ROOT / "jobs") in env["py_modules"]


def test_inside_a_submitted_job_the_job_brings_the_working_dir(monkeypatch):
    import jobs

    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {"working_dir": "x"}}')
    monkeypatch.chdir(REPO_ROOT)  # the checkout is the working dir: its jobs/ travels with it
    assert "working_dir" not in runtime_env()  # the two would conflict; Ray merges py_modules in
    assert runtime_env()["py_modules"] == [str(PACKAGE_DIR)]  # nor serve/, also there
    assert Path(jobs.__file__).resolve().parent == REPO_ROOT / "jobs"


def test_a_job_from_a_users_own_folder_ships_rayloops_jobs(monkeypatch, tmp_path):
    import jobs  # noqa: F401 - imported, as `python -m jobs.grpo` has by then

    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {"working_dir": "x"}}')
    monkeypatch.chdir(tmp_path)  # the user's folder: data and rewards, no jobs/
    modules = runtime_env()["py_modules"]
    assert modules[0] == str(PACKAGE_DIR) and str(REPO_ROOT / "jobs") in modules, modules


def test_local_cluster_declares_enough_logical_cpus():
    assert local_num_cpus(None) >= 8
    assert local_num_cpus(3) == 3


def test_joining_a_cluster_ships_no_local_folder_but_rayloops_jobs(monkeypatch):
    import jobs  # noqa: F401 - imported, as `python -m jobs.pretrain` has by then

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.chdir(REPO_ROOT)
    env = runtime_env(joining=True)
    assert "working_dir" not in env and str(REPO_ROOT / "jobs") in env["py_modules"]


@contextlib.contextmanager
def closed_port():
    """A loopback port bound but not listening while in use: connections to it are refused, and no other process
    can take it meanwhile."""
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        yield bound.getsockname()[1]


def test_an_unreachable_cluster_address_is_one_line_naming_where_it_came_from():
    import pytest

    from rayloop.cluster import check_reachable
    from rayloop.config import JobError

    with closed_port() as port:
        for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
            with pytest.raises(JobError, match="Ray is not reachable at .*Connection refused.*unset ray.address"):
                check_reachable(address, "ray.address")
    with pytest.raises(JobError, match="job API's address.*host:6379"):
        check_reachable("http://127.0.0.1:8265")
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        check_reachable(f"ray://127.0.0.1:{listening.getsockname()[1]}")  # answers: ray.init takes it from here
    check_reachable("auto")  # no port to try: ray.init finds the local cluster or says there is none


def test_a_job_with_ray_address_pointing_at_nothing_exits_in_seconds(tmp_path):
    """ray.init alone retries the GCS for over a minute, then prints a traceback."""
    import os
    import subprocess
    import sys
    import time

    from ray.util import get_node_ip_address

    with socket.socket() as bound:  # on the node's IP, where Ray would join a loopback address
        bound.bind((get_node_ip_address(), 0))
        env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{bound.getsockname()[1]}", "RAYLOOP_STORAGE": str(tmp_path)}
        start = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "jobs.pretrain", "--config", "jobs/configs/pretrain_tiny.yaml"],
                              cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 1 and len(errors) == 1 and "Ray is not reachable" in errors[0], done.stderr[-2000:]
    assert "Traceback" not in done.stderr and elapsed < 30, elapsed  # start-up, model build, then a 5 s probe at most
