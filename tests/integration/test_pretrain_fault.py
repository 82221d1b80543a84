"""SIGKILL a Ray Train worker in the middle of a checkpoint: the run restarts from the last complete checkpoint
(not from step 0, not from the half-written one), finishes, and every registered checkpoint stays loadable. While the
half-written one is there, the run folder resolves to the last registered checkpoint."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import psutil

from jobs import pretrain
from rayloop.config import load_config
from rayloop.models import load_model, resolve_model_folder


def _train_workers() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any("RayTrainWorker" in part for part in proc.info["cmdline"] or []):
            found.append(proc)
    return found


def test_worker_killed_mid_checkpoint_resumes_from_last_good_one(ray_cluster, tmp_path):
    cfg = load_config(pretrain.PretrainConfig, [
        f"--storage.path={tmp_path}", "--storage.name=fault", "--train.steps=30", "--train.checkpoint_every=10",
        "--train.max_failures=1", "--train.fault_delay_checkpoint_step=20", "--train.keep_checkpoints=5",
        "--task.num_train=1000", "--task.num_eval=50",
    ])
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(pretrain.main(cfg)), daemon=True)
    runner.start()

    run_dir = tmp_path / "fault"
    deadline = time.time() + 300
    # The step-20 checkpoint's folder appears in storage while rank 1 is held back for 30 s: kill a worker then.
    while len(list(run_dir.glob("checkpoint_*"))) < 2:
        assert time.time() < deadline and runner.is_alive(), "the step-20 checkpoint never started"
        time.sleep(0.5)
    time.sleep(2)
    workers = _train_workers()
    assert workers, "no RayTrainWorker process found"
    os.kill(workers[-1].pid, signal.SIGKILL)

    # The step-20 checkpoint folder is there, newest by name, but Ray Train never registered it: the run folder
    # resolves to the step-10 checkpoint, the newest one Ray Train did register.
    crashed = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())[-1]
    resolved = Path(resolve_model_folder(run_dir))
    assert resolved.parent != crashed, f"{run_dir} resolved to the unregistered {crashed.name}"
    assert json.loads((resolved.parent / "trainer_state.json").read_text())["step"] == 10

    runner.join(timeout=400)
    assert not runner.is_alive(), "the run did not finish after the restart"
    assert result["step"] == 30
    assert result["resumed_from_step"] == 10, f"expected a resume from step 10, got {result['resumed_from_step']}"
    load_model(result["model_dir"])
    for checkpoint in sorted(run_dir.glob("checkpoint_*")):
        if (checkpoint / "trainer_state.json").is_file():
            load_model(checkpoint / "hf")
