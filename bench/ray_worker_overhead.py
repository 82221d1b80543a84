"""Benchmark: what a Ray Train worker itself costs one process's training loop, on the machine's every core.

    .venv/bin/python bench/ray_worker_overhead.py            # CPU: `small` preset, bf16, 2 rounds (~6.5 min on 2 cores)

One worker holding every CPU, so no gradient exchange is in the figures, `small` preset, 8 x 128 tokens a step.
Each round runs, in turn (odd rounds in reverse order, so that no figure always runs first or last):
- bench/pretrain.py's plain PyTorch loop in a process of its own (the baseline), in a Ray task, and in a Ray Train
  worker: what Ray's process and Ray Train's worker take from the same loop;
- rayloop's step (bench/pretrain.py's DeepSpeed ZeRO-0 engine, as one worker would configure it) in a Ray Train
  worker and under torchrun with one process: what DeepSpeed's engine takes, with and without Ray Train.
Each figure's ratio to the round's own plain loop goes to bench/results/ray_worker_overhead.json and is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent)]
import pretrain as bench  # noqa: E402 - bench/pretrain.py, which puts the checkout on the path
from results_io import cpu_model  # noqa: E402

ROOT = bench.ROOT


def _plain_in_train_worker(args: dict) -> None:
    import ray.train

    result = bench._plain_loop(args)
    with tempfile.TemporaryDirectory() as tmp:  # Ray Train V2 carries metrics with a checkpoint only
        ray.train.report(result, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "ray_worker_overhead.json"))
    opts = parser.parse_args()

    import ray
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rayloop.cluster import init_ray
    from rayloop.models import create_model_folder
    from rayloop.precision import device_bf16
    from rayloop.tasks import ArithmeticTask

    model_dir = tempfile.mkdtemp(prefix="bench-model-")
    create_model_folder(opts.preset, ArithmeticTask().pretrain_corpus(), model_dir)
    args = {"model_dir": model_dir, "seq_len": 128, "global_batch": 8, "zero": 0, "warmup": 3, "steps": opts.steps,
            "gpu": False, "adamw": "fused", "precision": opts.precision}
    cpus = os.cpu_count()
    init_ray()
    ray.cloudpickle.register_pickle_by_value(bench)  # the workers import the checkout's packages, not bench/

    @ray.remote(num_cpus=cpus)
    def plain_in_task(a: dict) -> dict:
        return bench._plain_loop(a)

    def plain_in_train_worker() -> dict:
        trainer = TorchTrainer(_plain_in_train_worker, train_loop_config=args,
                               scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": cpus}),
                               run_config=RunConfig(storage_path=tempfile.mkdtemp(prefix="bench-")))
        return trainer.fit().metrics

    def torchrun_one_process() -> dict:
        os.environ["OMP_NUM_THREADS"] = str(cpus)  # Ray gives its worker as many threads as CPUs; so does this
        try:
            return bench.run_torchrun(args, 1)
        finally:
            del os.environ["OMP_NUM_THREADS"]

    figures = {
        "plain loop, own process": lambda: bench.run_alone("plain", args),
        "plain loop, Ray task": lambda: ray.get(plain_in_task.remote(args)),
        "plain loop, Ray Train worker": plain_in_train_worker,
        "rayloop step (ZeRO-0), Ray Train worker": lambda: bench.run_ray(args, 1, cpus_per_worker=cpus),
        "rayloop step (ZeRO-0), torchrun 1 process": torchrun_one_process,
    }
    rounds = []
    for i in range(opts.rounds):
        # Odd rounds run the figures in reverse: a shared machine's speed drifts within minutes, and a fixed order
        # would hand the drift to the same figures every round.
        order = list(figures) if i % 2 == 0 else list(reversed(figures))
        runs = {name: figures[name]() for name in order}
        base = runs["plain loop, own process"]["tokens_per_s"]
        rounds.append({name: {"tokens_per_s": round(runs[name]["tokens_per_s"], 1),
                              "of_plain": round(runs[name]["tokens_per_s"] / base, 3),
                              "torch_threads": runs[name].get("torch_threads"), "order": order.index(name)}
                       for name in figures})
        for name, figure in rounds[-1].items():
            print(f"round {i}: {name:<42} {figure['tokens_per_s']:>8,.1f} tokens/s  {figure['of_plain']:.3f} of plain"
                  f"  ({figure['torch_threads']} threads)")
    record = {"machine": f"{cpus} CPUs of {cpu_model()}; {device_bf16(False)[1]}", "preset": opts.preset,
              "precision": opts.precision, "cpus": cpus, "tokens_per_step": 8 * 128, "steps": opts.steps,
              "rounds": rounds}
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"figures in {opts.out}")


if __name__ == "__main__":
    main()
