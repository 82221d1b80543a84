"""`ray job submit --working-dir .` runs the submitted checkout, edits included, on the driver and on workers,
against a head started on loopback with Ray's token authentication on; then every training job, through the same
job API, succeeds."""

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))

PROBE = '''
import ray, rayloop, serve
from rayloop.cluster import init_ray

init_ray()

@ray.remote
def probe():
    import rayloop, serve
    return rayloop.EDIT_MARKER, serve.EDIT_MARKER

print("driver", rayloop.EDIT_MARKER, serve.EDIT_MARKER, "worker", *ray.get(probe.remote()))
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_job_api(address: str, timeout_s: float = 120) -> int:
    """Poll the job API without a token until it answers; return the status it answered with."""
    deadline = time.time() + timeout_s
    while True:
        try:
            return urllib.request.urlopen(f"{address}/api/jobs/", timeout=5).status
        except urllib.error.HTTPError as err:
            return err.code
        except OSError:
            assert time.time() < deadline, f"no job API at {address} after {timeout_s} s"
            time.sleep(2)


def test_submitted_job_runs_the_edited_checkout(tmp_path):
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT, checkout, ignore=shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info"))
    marker = uuid.uuid4().hex[:12]
    # Edits made after `pip install -e .` (which points at ROOT, not at this copy): only the upload can carry them.
    for package in ("platform/rayloop", "serve"):
        with open(checkout / package / "__init__.py", "a") as f:
            f.write(f"\nEDIT_MARKER = {marker!r}\n")
    (checkout / "jobs" / "edit_probe.py").write_text(PROBE)

    dashboard_port = _free_port()
    address = f"http://127.0.0.1:{dashboard_port}"
    # Clients of a token-authenticated cluster say so (README). `ray start` does not create a missing token, so the
    # test brings its own, as an operator does (cluster.yaml too), rather than rely on ~/.ray/auth_token existing.
    token_file = tmp_path / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    # The venv's bin first, as after `source .venv/bin/activate`: the head runs the entrypoint's `python` from PATH.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    # Its own temp dir (short: Ray's socket paths have a length limit), so the head's ray_current_cluster file never
    # outlives it where other Ray processes on this machine would look for a cluster to join.
    temp_dir = tempfile.mkdtemp(prefix="rl-", dir="/tmp")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--temp-dir={temp_dir}", f"--port={_free_port()}", "--num-cpus=4", "--include-dashboard=true",
         "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
         f"--dashboard-agent-listen-port={_free_port()}", f"--ray-client-server-port={_free_port()}",
         "--object-store-memory=200000000"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert _wait_for_job_api(address) == 401, "the job API answered a request without the token"
        submit = subprocess.run(
            [RAY, "job", "submit", f"--address={address}", "--working-dir", ".", "--",
             "python", "-m", "jobs.edit_probe"],
            cwd=checkout, env=env, capture_output=True, text=True, timeout=300)
        output = submit.stdout + submit.stderr
        assert submit.returncode == 0, output[-3000:]
        assert "succeeded" in output, output[-3000:]
        assert f"driver {marker} {marker} worker {marker} {marker}" in output, output[-3000:]

        # The real pretraining job through the same job API: 2 Ray Train workers, DeepSpeed ZeRO-2.
        submit = subprocess.run(
            [RAY, "job", "submit", f"--address={address}", "--working-dir", ".", "--",
             "python", "-m", "jobs.pretrain", "--config", "jobs/configs/pretrain_tiny.yaml", "--train.steps=6",
             "--train.checkpoint_every=3", "--task.num_train=500", "--task.num_eval=20",
             f"--storage.path={tmp_path / 'runs'}"],
            cwd=checkout, env=env, capture_output=True, text=True, timeout=400)
        output = submit.stdout + submit.stderr
        assert submit.returncode == 0 and "succeeded" in output, output[-3000:]
        assert "pretrain: step 6" in output, output[-3000:]
        assert len(list((tmp_path / "runs" / "pretrain-tiny").glob("checkpoint_*/hf/model.safetensors"))) == 2

        # Every post-training job through the job API, each starting from the previous run's folder; GRPO combines
        # the exact-match, format and learned rewards; RLOO is the GRPO job with another algorithm.
        runs = tmp_path / "runs"
        common = ["--train.steps=4", "--train.checkpoint_every=2", "--train.eval_samples=8", "--task.num_train=500",
                  "--task.num_eval=20", f"--storage.path={runs}"]
        jobs = [
            ("sft", [f"--model.name_or_path={runs / 'pretrain-tiny'}"]),
            ("reward", [f"--model.name_or_path={runs / 'sft-tiny'}"]),
            ("dpo", [f"--model.name_or_path={runs / 'sft-tiny'}"]),
            ("grpo", [f"--model.name_or_path={runs / 'sft-tiny'}", "--train.per_device_batch_size=8",
                      f"--rewards=[{{name: exact_match}}, {{name: format, weight: 0.2}}, "
                      f"{{name: reward_model, path: {runs / 'reward-tiny'}, weight: 0.5}}]"]),
            ("grpo", [f"--model.name_or_path={runs / 'sft-tiny'}", "--train.per_device_batch_size=8",
                      "--algorithm=rloo", "--storage.name=rloo-tiny"]),
        ]
        for job, overrides in jobs:
            submit = subprocess.run(
                [RAY, "job", "submit", f"--address={address}", "--working-dir", ".", "--", "python", "-m",
                 f"jobs.{job}", "--config", f"jobs/configs/{job}_tiny.yaml", *common, *overrides],
                cwd=checkout, env=env, capture_output=True, text=True, timeout=400)
            output = submit.stdout + submit.stderr
            assert submit.returncode == 0 and "succeeded" in output, f"{job} {overrides}: {output[-3000:]}"
        for run in ("sft-tiny", "reward-tiny", "dpo-tiny", "grpo-tiny", "rloo-tiny"):
            assert len(list((runs / run).glob("checkpoint_*/checkpoint/model.safetensors"))) == 2, run
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)
        shutil.rmtree(temp_dir, ignore_errors=True)
