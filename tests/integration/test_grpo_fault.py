"""SIGKILL a Ray Train worker in the middle of a GRPO run (vLLM rollouts colocated in the workers): Ray Train
restarts the worker group, TRL resumes from the last reported checkpoint, and the run finishes."""

import os
import signal
import threading
import time

from conftest import posttrain_config
from jobs import grpo
from rayloop.models import load_model
from test_pretrain_fault import _train_workers


def test_grpo_worker_killed_mid_run_resumes_and_finishes(sft_result, posttrain_runs):
    cfg = posttrain_config(grpo.GRPOJobConfig, "grpo_tiny.yaml", posttrain_runs,
                           f"--model.name_or_path={sft_result['model_dir']}", "--storage.name=grpo-fault",
                           "--train.steps=30", "--train.checkpoint_every=10", "--train.max_failures=1",
                           "--train.fault_pause_step=15", "--train.keep_checkpoints=5")
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(grpo.main(cfg)), daemon=True)
    runner.start()

    run_dir = posttrain_runs / "grpo-fault"
    deadline = time.time() + 400
    while not list(run_dir.glob("checkpoint_*/checkpoint/model.safetensors")):
        assert time.time() < deadline and runner.is_alive(), "the step-10 checkpoint never appeared"
        time.sleep(0.5)
    time.sleep(8)  # every worker is now held at step 15 for 30 s
    workers = _train_workers()
    assert workers, "no RayTrainWorker process found"
    os.kill(workers[-1].pid, signal.SIGKILL)

    runner.join(timeout=500)
    assert not runner.is_alive(), "the run did not finish after the restart"
    assert result["step"] == 30
    assert result["resumed_from_step"] == 10, f"expected a resume from step 10, got {result['resumed_from_step']}"
    load_model(result["model_dir"])
