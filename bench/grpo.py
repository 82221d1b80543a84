"""Benchmark: a GRPO step with vLLM rollouts vs with the trainer's own generation, same config, same run.

    .venv/bin/python bench/grpo.py                       # CPU: `small` preset (~25M), 2 workers, colocated vLLM
    .venv/bin/python bench/grpo.py --preset 125m --gpu   # a GPU machine: TRL's colocate mode on the GPU

Both runs are jobs.grpo on Ray Train (2 workers, ZeRO-2), from the same randomly initialised model folder, with
long completions (a random model rarely stops early, so every completion has `--completion-tokens` tokens and
the two engines generate the same amount). Step time = mean wall seconds per optimizer step, rollouts, reward,
weight sync and update included, over the steps after the first `--warmup` (measured by rayloop.posttrain).
Ratio = vLLM / trainer generation (goal <= 0.5). TRL's own phase timings (generation, weight sync, log-prob
forwards, loss) are recorded beside each, with the share of the trainer's step spent generating, which bounds the
ratio from below. Figures go to bench/results/grpo.json and are printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "platform")]


def run(engine: str, model_dir: str, storage: str, args) -> dict:
    from jobs import grpo
    from rayloop.config import load_config
    from rayloop.posttrain import fit

    steps = args.warmup + args.steps
    cfg = load_config(grpo.GRPOJobConfig, [
        f"--model.name_or_path={model_dir}", f"--storage.path={storage}", f"--storage.name=bench-{engine}",
        f"--rollout.engine={engine}", f"--rollout.max_completion_length={args.completion_tokens}",
        f"--rollout.num_generations={args.generations}", f"--rollout.max_model_len={args.completion_tokens + 32}",
        f"--train.per_device_batch_size={args.batch}", f"--train.steps={steps}", f"--train.log_every={steps}",
        f"--train.checkpoint_every={steps}", "--train.eval_samples=0", f"--scaling.use_gpu={args.gpu}",
        f"--scaling.num_workers={args.workers}",
    ])
    # Timed steps only: the log at the last step averages the steps since the previous log, so log once after
    # the warm-up (a first log at the warm-up step) and once at the end.
    cfg.train.log_every = args.warmup if args.warmup else steps
    started = time.perf_counter()
    summary = fit(cfg, grpo.build_trainer, plot_keys=["reward"], plot_name="reward")
    return {"step_seconds": summary["step_seconds"], "wall_seconds": time.perf_counter() - started,
            "completion_length": summary.get("completions/mean_length"),
            # TRL's own phase timings (rayloop.posttrain puts them in the logs): where the step's time goes.
            "phase_seconds": {k.removeprefix("time/"): v for k, v in summary.items() if k.startswith("time/")}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="small")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16, help="completions per worker per step")
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--completion-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "grpo.json"))
    args = parser.parse_args()

    from rayloop.cluster import init_ray
    from rayloop.models import count_parameters, create_model_folder, load_model
    from rayloop.tasks import ArithmeticTask

    work = tempfile.mkdtemp(prefix="bench-grpo-")
    model_dir = str(create_model_folder(args.preset, ArithmeticTask().pretrain_corpus(), f"{work}/model"))
    init_ray()
    results = {}
    for engine in ("trainer", "vllm"):
        results[engine] = run(engine, model_dir, work, args)
        print(f"{engine}: {results[engine]}", flush=True)
    figures = {
        "preset": args.preset, "parameters": count_parameters(load_model(model_dir)[0]),
        "device": "gpu" if args.gpu else "cpu", "workers": args.workers,
        "completions_per_step": args.batch * args.workers, "num_generations": args.generations,
        "completion_tokens": args.completion_tokens, "timed_steps": args.steps,
        "trainer_generation": results["trainer"], "vllm_rollouts": results["vllm"],
        "ratio_vllm_over_trainer": results["vllm"]["step_seconds"] / results["trainer"]["step_seconds"],
        "goal": "<= 0.5",
    }
    # Amdahl: the ratio cannot go below the share of the trainer's step that is not generation, however fast the
    # rollouts; the goal needs generation to be more than half of the step.
    trainer_generation = results["trainer"]["phase_seconds"].get("transformers.generate")
    if trainer_generation is not None:
        share = trainer_generation / results["trainer"]["step_seconds"]
        figures["trainer_step_share_in_generation"] = share
        figures["lowest_ratio_if_rollouts_took_no_time"] = 1 - share
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    print(f"GRPO step: trainer generation {results['trainer']['step_seconds']:.2f} s, vLLM rollouts "
          f"{results['vllm']['step_seconds']:.2f} s, ratio {figures['ratio_vllm_over_trainer']:.2f} (goal <= 0.5)")
    if "lowest_ratio_if_rollouts_took_no_time" in figures:
        print(f"generation is {figures['trainer_step_share_in_generation']:.0%} of the trainer's step: no rollout "
              f"engine can bring the ratio below {figures['lowest_ratio_if_rollouts_took_no_time']:.2f} here")


if __name__ == "__main__":
    main()
