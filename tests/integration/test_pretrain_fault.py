"""SIGKILL a Ray Train worker in the middle of a checkpoint: the run restarts from the last complete checkpoint
(not from step 0, not from the half-written one), finishes, and every registered checkpoint stays loadable. A newer
checkpoint folder that Ray Train never registered does not change what the run folder resolves to."""

import json
import os
import shutil
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
    # Once Ray Train has registered the step-10 checkpoint, the ranks reach the step-20 one within a second or two;
    # there rank 1 is held back for 30 s while rank 0 waits in ray.train.report. Kill a worker inside that window.
    while not (run_dir / "checkpoint_manager_snapshot.json").is_file():
        assert time.time() < deadline and runner.is_alive(), "the step-10 checkpoint was never registered"
        time.sleep(0.5)
    time.sleep(8)
    workers = _train_workers()
    assert workers, "no RayTrainWorker process found"
    os.kill(workers[-1].pid, signal.SIGKILL)

    runner.join(timeout=400)
    assert not runner.is_alive(), "the run did not finish after the restart"
    assert result["step"] == 30
    assert result["resumed_from_step"] == 10, f"expected a resume from step 10, got {result['resumed_from_step']}"
    load_model(result["model_dir"])

    # A checkpoint folder newer than any that Ray Train registered, as a crash in the middle of writing one leaves
    # it (the model folder there, the rest missing): the run folder still resolves to the last registered one.
    final = Path(result["model_dir"]).parent
    crashed = run_dir / "checkpoint_2999-01-01_00-00-00.000000"
    shutil.copytree(final / "hf", crashed / "hf")
    resolved = Path(resolve_model_folder(run_dir))
    assert resolved.parent == final, f"{run_dir} resolved to {resolved}, not the last registered {final.name}"
    assert json.loads((resolved.parent / "trainer_state.json").read_text())["step"] == 30
    shutil.rmtree(crashed)
    for checkpoint in sorted(run_dir.glob("checkpoint_*")):
        if (checkpoint / "trainer_state.json").is_file():
            load_model(checkpoint / "hf")
