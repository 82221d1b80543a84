"""The demo (`make demo`: pretrain -> SFT -> GRPO -> registry -> endpoint) over seeds and precisions, end to end.

    .venv/bin/python bench/demo_seeds.py                          # seeds 0,1,2 x fp32,bf16: 6 runs
    .venv/bin/python bench/demo_seeds.py --seeds 0 --precisions auto

Each run is `python -m jobs.pipeline --config jobs/configs/pipeline_tiny.yaml --seed=S` in a process of its own (its
own local Ray, endpoint and registry, in a fresh folder), exactly as `make demo` runs, with `RAYLOOP_CPU_BF16`
deciding what the precision `auto` of every stage picks (`auto`: the machine's own choice). The seed sets the model's
initialisation and every stage's data order; the 1000 held-out problems are the same in every run. Each stage's
held-out figure, with its 95% confidence interval, and the endpoint's exact match go to
bench/results/demo_seeds.json and demo_seeds.md, with the machine, the command and the commit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "platform")]

from bench.results_io import machine, write_results  # noqa: E402

FORCE = {"fp32": "0", "bf16": "1"}


def run_demo(seed: int, precision: str, storage: str, log_dir: Path) -> dict:
    """One pipeline run in its own process; its results.json, with the run's wall time."""
    name = f"demo-{precision}-{seed}"
    env = dict(os.environ)
    if precision in FORCE:
        env["RAYLOOP_CPU_BF16"] = FORCE[precision]
    command = [sys.executable, "-m", "jobs.pipeline", "--config", "jobs/configs/pipeline_tiny.yaml", f"--seed={seed}",
               f"--storage.path={storage}", f"--storage.name={name}"]
    started = time.perf_counter()
    with open(log_dir / f"{name}.log", "w") as log:
        done = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if done.returncode:
        raise SystemExit(f"{name} failed (exit {done.returncode}); its output: {log_dir / f'{name}.log'}")
    results = json.loads(Path(storage, name, "results.json").read_text())
    results["wall_seconds"] = time.perf_counter() - started
    return results


def row(seed: int, precision: str, results: dict) -> dict:
    sft, grpo = results["sft_summary"], results["grpo_summary"]
    endpoint, n = results["endpoint_accuracy"], grpo["exact_match"]["n"]
    half = 1.96 * math.sqrt(endpoint * (1 - endpoint) / n)

    def figure(d: dict) -> dict:
        return {k: round(d[k], 4) for k in ("before", "after", "difference", "ci_low", "ci_high")} | {"n": d["n"]}

    return {"seed": seed, "precision_forced": precision, "auto_chose": results["precision"],
            "pretrain_eval_loss": [round(results["eval_loss_before"], 3), round(results["eval_loss"], 3)],
            "sft_exact_match": figure(sft["exact_match"]), "grpo_greedy_exact_match": figure(grpo["exact_match"]),
            "grpo_sampled_reward": figure(grpo["sampled_reward"]),
            "endpoint_exact_match": {"value": round(endpoint, 4), "ci_low": round(endpoint - half, 4),
                                     "ci_high": round(endpoint + half, 4), "n": n,
                                     "answered_by": results["endpoint_versions"]},
            "wall_seconds": None if results["wall_seconds"] is None else round(results["wall_seconds"])}


def markdown(rows: list[dict]) -> list[str]:
    def ci(d: dict) -> str:
        return f"{d['before']:.1%} → {d['after']:.1%} ({d['difference']:+.1%}, CI [{d['ci_low']:+.1%}, {d['ci_high']:+.1%}])"

    lines = ["| precision (auto chose) | seed | pretrain eval loss | SFT held-out exact match | GRPO greedy exact match "
             "| GRPO sampled reward | endpoint exact match (95% CI) | wall |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = r["endpoint_exact_match"]
        lines.append(f"| {r['precision_forced']} ({r['auto_chose']}) | {r['seed']} | "
                     f"{r['pretrain_eval_loss'][0]:.3f} → {r['pretrain_eval_loss'][1]:.3f} | "
                     f"{ci(r['sft_exact_match'])} | {ci(r['grpo_greedy_exact_match'])} | "
                     f"{ci(r['grpo_sampled_reward'])} | {e['value']:.1%} [{e['ci_low']:.1%}, {e['ci_high']:.1%}] | "
                     + (f"{r['wall_seconds'] // 60}m{r['wall_seconds'] % 60:02d}s |" if r["wall_seconds"] else "— |"))
    sft = [r["sft_exact_match"]["after"] for r in rows]
    gain = [r["grpo_greedy_exact_match"]["difference"] for r in rows]
    gain_low = [r["grpo_greedy_exact_match"]["ci_low"] for r in rows]
    end = [r["endpoint_exact_match"]["value"] for r in rows]
    lines += ["", f"Summary over {len(rows)} runs: SFT {min(sft):.1%}–{max(sft):.1%}; GRPO's greedy gain "
                  f"{min(gain):+.1%} to {max(gain):+.1%} (lowest CI bound {min(gain_low):+.1%}); endpoint "
                  f"{min(end):.1%}–{max(end):.1%}."]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1,2", help="pipeline seeds (model init and every stage's data order)")
    parser.add_argument("--precisions", default="fp32,bf16",
                        help="fp32 and bf16 force RAYLOOP_CPU_BF16; auto leaves the machine's choice")
    parser.add_argument("--name", default="demo_seeds", help="bench/results/<name>.json and .md")
    parser.add_argument("--from-runs", metavar="DIR", help="tabulate the finished runs in DIR (a folder an earlier, "
                        "interrupted invocation printed) instead of running; --seeds/--precisions still name them")
    args = parser.parse_args()
    if args.from_runs:
        rows = []
        for precision in args.precisions.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                results = Path(args.from_runs, f"demo-{precision}-{seed}", "results.json")
                if results.exists():
                    record = json.loads(results.read_text())
                    record["wall_seconds"] = None  # the run itself does not record it
                    rows.append(row(seed, precision, record))
        table = markdown(rows)
        print("\n".join(table))
        write_results(args.name, {"machine": machine(), "rows": rows}, table,
                      command=f"bench/demo_seeds.py --seeds {args.seeds} --precisions {args.precisions} "
                              f"(runs {len(rows)} of them finished; tabulated with --from-runs)")
        return
    from bench.results_io import commit

    code = commit()  # what the runs run, whatever is committed while they do
    storage = tempfile.mkdtemp(prefix="rayloop-demo-seeds-")
    logs = Path(storage, "logs")
    logs.mkdir()
    print(f"runs and their logs in {storage}", flush=True)
    rows = []
    for precision in args.precisions.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            rows.append(row(seed, precision, run_demo(seed, precision, storage, logs)))
            print("\n".join(markdown(rows[-1:])[2:3]), flush=True)
    table = markdown(rows)
    print("\n".join(table))
    write_results(args.name, {"machine": machine(), "rows": rows}, table, code=code,
                  command=f"bench/demo_seeds.py --seeds {args.seeds} --precisions {args.precisions}")


if __name__ == "__main__":
    main()
