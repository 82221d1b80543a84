"""Probe: the demo's pretrain -> SFT chain in fp32 and in bf16, over several SFT seeds, in the jobs themselves.

    .venv/bin/python bench/sft_seeds.py                      # seeds 0,1,2, both precisions: ~25 min on 2 cores
    .venv/bin/python bench/sft_seeds.py --cross              # also SFT each pretrained model in the other precision
    .venv/bin/python bench/sft_seeds.py --seeds 0 --precisions fp32
    .venv/bin/python bench/sft_seeds.py --suite --seeds 0,1,2,3   # the test suite's SFT, in `auto` as it is (~7 min)

Not a speed benchmark. The demo's SFT figure (held-out exact match after `jobs/configs/sft_tiny.yaml`) sits on a
late, steep climb, and where the climb lands at the last step moves with anything that changes the trajectory: the
precision, the AdamW kernel, the starting model and, as this probe measures, the order in which the same problems are
drawn. Each precision pretrains once as the demo does (`pretrain_tiny.yaml` on the pipeline's task split), then SFT
runs from that model once per seed (`train.seed`, which sets the data order; the tiny preset has no dropout), all
through `jobs.pretrain` and `jobs.sft` on one local Ray cluster. A chain's spread over seeds is the yardstick for the
difference between chains, which differ in their pretrained model as well as in their SFT's precision; `--cross`
separates the two. Figures go to bench/results/sft_seeds.json (appended) and are printed; the runs go to a fresh
temporary folder (printed), unregistered. `--suite` runs the test suite's SFT fixture instead (tests/integration/
conftest.py: 300 held-out problems, 600 SFT steps, before exact match's climb), with its held-out loss.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "platform")]

# The pipeline's task split (jobs/configs/pipeline_tiny.yaml): the same 1000 held-out problems as the demo.
TASK = ['--task.ops=["+"]', "--task.num_train=4000", "--task.num_eval=1000"]
# The test suite's fixture (tests/integration/conftest.py): its 300 held-out problems and 600 SFT steps.
SUITE_TASK = ['--task.ops=["+"]', "--task.num_train=4000", "--task.num_eval=300"]
SUITE_SFT = ["--train.steps=600", "--train.checkpoint_every=300"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1,2", help="SFT seeds (train.seed: the data order)")
    parser.add_argument("--precisions", help="deepspeed.precision values (default: fp32,bf16; with --suite, auto, "
                                              "as the suite's fixture sets none)")
    parser.add_argument("--cross", action="store_true", help="SFT each pretrained model in every precision")
    parser.add_argument("--suite", action="store_true", help="the test suite's SFT fixture instead of the demo's")
    parser.add_argument("--out", default=str(ROOT / "bench/results/sft_seeds.json"))
    args = parser.parse_args()

    from jobs import pretrain, sft
    from rayloop.cluster import init_ray
    from rayloop.config import load_config
    from rayloop.precision import cpu_bf16

    storage = tempfile.mkdtemp(prefix="rayloop-sft-seeds-")
    print(f"runs in {storage}", flush=True)
    init_ray()
    precisions = (args.precisions or ("auto" if args.suite else "fp32,bf16")).split(",")
    results = []
    for pretrained_in in precisions:
        # Unregistered: a set MLFLOW_TRACKING_URI would otherwise receive every probe model.
        common = [*(SUITE_TASK if args.suite else TASK), f"--storage.path={storage}", "--registry.enabled=false"]
        pre_cfg = load_config(pretrain.PretrainConfig, ["--config", str(ROOT / "jobs/configs/pretrain_tiny.yaml"),
                                                        *common, f"--deepspeed.precision={pretrained_in}",
                                                        f"--storage.name=pretrain-{pretrained_in}"])
        pre = pretrain.main(pre_cfg)
        for precision in precisions if args.cross else [pretrained_in]:
            for seed in (int(s) for s in args.seeds.split(",")):
                sft_cfg = load_config(sft.SFTJobConfig, [
                    "--config", str(ROOT / "jobs/configs/sft_tiny.yaml"), *common,
                    f"--deepspeed.precision={precision}", f"--model.name_or_path={pre['model_dir']}",
                    f"--train.seed={seed}", f"--storage.name=sft-{pretrained_in}-{precision}-{seed}",
                    *(SUITE_SFT if args.suite else [])])
                started = time.perf_counter()
                summary = sft.main(sft_cfg)
                em, loss = summary["exact_match"], summary["held_out_loss"]
                results.append({"pretrained_in": pretrained_in, "precision": precision, "seed": seed,
                                "setting": "suite fixture" if args.suite else "demo",
                                "pretrain_eval_loss": round(pre["eval_loss"], 3),
                                # What `auto` resolved to; the SFT on the same machine resolves it the same way.
                                "pretrain_precision": pre["precision"],
                                "exact_match_before": round(em["before"], 3), "exact_match": round(em["after"], 3),
                                "exact_match_gain_ci": [round(em["ci_low"], 3), round(em["ci_high"], 3)],
                                "held_out_loss": [round(loss["before"], 3), round(loss["after"], 3)],
                                "held_out_loss_change_ci": [round(loss["ci_low"], 3), round(loss["ci_high"], 3)],
                                "sft_seconds": round(time.perf_counter() - started),
                                "machine": f"{os.cpu_count()} cores, {cpu_bf16()[1]}",
                                "measured": time.strftime("%Y-%m-%d"), "how": "bench/sft_seeds.py"})
                print(f"pretrained in {pretrained_in}, SFT in {precision}, seed {seed}: held-out exact match "
                      f"{em['before']:.1%} -> {em['after']:.1%} (gain CI [{em['ci_low']:+.1%}, {em['ci_high']:+.1%}]), "
                      f"loss {loss['before']:.3f} -> {loss['after']:.3f} (change CI [{loss['ci_low']:+.3f}, "
                      f"{loss['ci_high']:+.3f}])", flush=True)
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps(previous + results, indent=1) + "\n")
    held_out = SUITE_TASK[-1] if args.suite else TASK[-1]
    print(f"\nheld-out exact match (and loss) after the {'suite' if args.suite else 'demo'}'s SFT "
          f"({held_out.split('=')[1]} problems), per chain and SFT seed:")
    for pretrained_in in precisions:
        for precision in precisions:
            row = [r for r in results if (r["pretrained_in"], r["precision"]) == (pretrained_in, precision)]
            if row:
                seeds = ", ".join(f"seed {r['seed']} {r['exact_match']:.1%} ({r['held_out_loss'][1]:.3f})" for r in row)
                print(f"  pretrained in {pretrained_in} (eval loss {row[0]['pretrain_eval_loss']:.3f}), SFT in "
                      f"{precision}: {seeds}")
    print(f"figures appended to {out}")


if __name__ == "__main__":
    main()
