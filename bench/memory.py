"""Benchmark: each pretraining worker's peak host memory through its run's phases, by ZeRO stage.

    .venv/bin/python bench/memory.py                   # the 350m preset (~346M parameters), 2 CPU workers
    .venv/bin/python bench/memory.py --preset small    # the 25M preset: memory_small.{json,md}
    .venv/bin/python bench/memory.py --render          # the plan recomputed beside the recorded figures

The real job (jobs.pretrain through Ray Train, DeepSpeed on 2 workers) for ZeRO-0, ZeRO-2 and ZeRO-3, and ZeRO-3 as
it ran without partitioned construction and with one gather of every parameter at save ("whole model", a worker
set-up hook puts the old code back), each 3 steps with a checkpoint at the last. The phases are the job's own
(rayloop.memory): build (the model), engine (deepspeed.initialize), data, first step, steady state, save. The
workers run with MALLOC_MMAP_THRESHOLD_=65536, so that memory a phase frees leaves the resident set and the next
phase's peak is its own rather than glibc's cache of the last one's. Then ZeRO-3 resumes its run to
step 5 ("resume"), against the same 5 steps uninterrupted: the losses after the resume must equal the
uninterrupted run's. The saved `hf/` folder loads in transformers and in vLLM.
Beside each run, the memory plan's estimate (rayloop/plan.py) for the same config.
Goals (issue: memory at scale): ZeRO-3's non-writing rank at save <= its steady state + 10% of the fp32 model;
ZeRO-3's build <= 0.6x ZeRO-0's; losses after the resume within 1e-3; the plan within 25% of the steady state.
Figures go to bench/results/memory.{json,md} (memory_<preset> for other presets).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "platform"), str(ROOT / "bench")]

GIB = 2**30


def _whole_model_zero3() -> None:
    """Ray worker set-up hook: ZeRO-3 built whole on every rank and saved through one gather of all parameters."""
    import rayloop.models
    import rayloop.train as train

    def gathered_all_at_once(engine):
        import deepspeed
        import torch.distributed as dist

        engine.empty_partition_cache()  # parameters an eval prefetched, as the job's own save releases them
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            if dist.get_rank() == 0:
                return {k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()}
        return None

    train.gathered_state_dict = gathered_all_at_once
    train.load_partitioned = lambda path, ds_config, dtype: rayloop.models.load_model(path, dtype=dtype)


def _config(storage: Path, name: str, model: str, zero: int, steps: int):
    from jobs import pretrain
    from rayloop.config import load_config

    return load_config(pretrain.PretrainConfig, [
        f"--model.name_or_path={model}", f"--storage.path={storage}", f"--storage.name={name}",
        f"--deepspeed.zero_stage={zero}", f"--train.steps={steps}", "--train.checkpoint_every=3",
        "--train.log_every=1", "--train.global_batch_size=4", "--train.keep_checkpoints=1", "--registry.enabled=false",
        # A learning rate that does not depend on the run's length: 3 steps then 2 more follow the same one as 5.
        "--optim.schedule=constant", "--optim.warmup_steps=0", "--task.num_train=400", "--task.num_eval=20",
    ])


def _planned(preset: str) -> dict[str, int]:
    """The memory plan's total per worker (rayloop/plan.py) for each run's config, the preset standing for the
    folder built from it (the same shape)."""
    from rayloop.plan import plan_of

    with tempfile.TemporaryDirectory() as storage:
        return {name: plan_of(_config(Path(storage), "plan", preset, zero, 3)).total
                for name, zero in (("ZeRO-0", 0), ("ZeRO-2", 2), ("ZeRO-3", 3))}


def _pretrain(storage: Path, name: str, model_dir: str, zero: int, steps: int, hook=None) -> dict:
    import logging

    import ray

    from jobs import pretrain
    from rayloop.cluster import local_num_cpus, runtime_env
    from rayloop.config import RaySection

    ray.shutdown()
    env = {**runtime_env(), "env_vars": {"MALLOC_MMAP_THRESHOLD_": "65536"}}
    if hook is not None:
        env["worker_process_setup_hook"] = hook
    # As rayloop.cluster.init_ray starts Ray, with the workers' environment above.
    ray.init(address="local", num_cpus=local_num_cpus(None), object_store_memory=RaySection().object_store_memory_mb
             * 2**20, include_dashboard=True, dashboard_host="127.0.0.1", runtime_env=env,
             logging_level=logging.WARNING)
    cfg = _config(storage, name, model_dir, zero, steps)
    started = time.perf_counter()
    summary = pretrain.main(cfg)
    summary["wall_s"] = time.perf_counter() - started
    state = json.loads((Path(summary["checkpoint"]) / "trainer_state.json").read_text())
    summary["losses"] = {int(step): loss for step, loss in state["history"]["loss"]}
    return summary


def _loads(hf: str) -> dict:
    """The saved folder through transformers and vLLM: each one's greedy continuation of the same prompt."""
    from rayloop.config import GenerateSection
    from rayloop.generate import vllm_generate
    from rayloop.models import load_model

    model, tokenizer = load_model(hf)
    ids = tokenizer("12+34=", return_tensors="pt").input_ids
    hf_text = tokenizer.decode(model.generate(ids, max_new_tokens=4, do_sample=False)[0, ids.shape[1]:])
    del model
    vllm_text = vllm_generate(hf, ["12+34="], GenerateSection(max_tokens=4, temperature=0.0))[0]["text"]
    return {"transformers": hf_text, "vllm": vllm_text}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="350m")
    parser.add_argument("--render", action="store_true",
                        help="recompute the memory plan beside the recorded measurements and rewrite the Markdown "
                             "table from the JSON; run nothing")
    args = parser.parse_args()
    name = "memory" if args.preset == "350m" else f"memory_{args.preset}"
    if args.render:
        from results_io import RESULTS

        record = json.loads((RESULTS / f"{name}.json").read_text())
        from results_io import commit

        record["planned_bytes"], record["planned_at"] = _planned(record["preset"]), commit()
        (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
        (RESULTS / f"{name}.md").write_text("\n".join(
            [*(RESULTS / f"{name}.md").read_text().split("\n")[:5], "", *render(record)]) + "\n")
        return

    from rayloop.models import count_parameters, create_model_folder, load_model
    from rayloop.tasks import ArithmeticTask
    from results_io import commit, write_results

    code = commit()
    work = Path(tempfile.mkdtemp(prefix="rayloop-memory-"))
    try:
        model_dir = str(create_model_folder(args.preset, ArithmeticTask().pretrain_corpus(), work / "base"))
        parameters = count_parameters(load_model(model_dir)[0])
        fp32_bytes = 4 * parameters
        runs = {}
        for name, zero, hook in [("ZeRO-0", 0, None), ("ZeRO-2", 2, None), ("ZeRO-3 whole model", 3, _whole_model_zero3),
                                 ("ZeRO-3", 3, None)]:
            runs[name] = _pretrain(work, name.replace(" ", "-"), model_dir, zero, 3, hook)
            print(name, json.dumps(runs[name]["memory_peak_bytes"]), flush=True)
            if name != "ZeRO-3":  # resumed below; the others' checkpoints (weights and optimizer state) go
                shutil.rmtree(work / name.replace(" ", "-"))
        resumed = _pretrain(work, "ZeRO-3", model_dir, 3, 5)
        straight = _pretrain(work, "ZeRO-3-uninterrupted", model_dir, 3, 5)
        loads = _loads(resumed["model_dir"])
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)

    record = {
        "preset": args.preset, "parameters": parameters, "fp32_model_bytes": fp32_bytes,
        "peak_bytes": {k: r["memory_peak_bytes"] for k, r in runs.items()},
        "resumed_peak_bytes": resumed["memory_peak_bytes"],
        "resumed_losses": resumed["losses"], "uninterrupted_losses": straight["losses"],
        "loads": loads, "wall_s": {k: r["wall_s"] for k, r in runs.items()},
        "planned_bytes": _planned(args.preset), "planned_at": code,
    }
    table = render(record)
    write_results(name, record, table, command=" ".join(["bench/memory.py", *sys.argv[1:]]), code=code)
    print("\n".join(table))


def render(record: dict) -> list[str]:
    """The Markdown table and the goals' figures from a record (also from bench/results/memory.json, `--render`)."""
    peaks, fp32 = record["peak_bytes"], record["fp32_model_bytes"]
    zero3, whole, zero0 = peaks["ZeRO-3"], peaks["ZeRO-3 whole model"], peaks["ZeRO-0"]

    def gib(values):
        return " / ".join(f"{b / GIB:.2f}" for b in values)

    def added(run, phase, rank):  # what the phase added to what the process held when it began, x the fp32 model
        return (run[phase][rank] - run[f"{phase}_entry"][rank]) / fp32

    def through_engine(run):  # ZeRO-0's weights are mapped at build and read only when the engine touches them
        return max(max(run["build"]), max(run["engine"]))

    losses = {k: {int(s): v for s, v in record[k].items()} for k in ("resumed_losses", "uninterrupted_losses")}
    gap = max(abs(losses["resumed_losses"][s] - losses["uninterrupted_losses"][s]) for s in (4, 5))
    phases = ["build", "engine", "data", "first_step", "steady", "save"]
    table = [f"{record['preset']} preset: {record['parameters'] / 1e6:.0f}M parameters ({fp32 / GIB:.2f} GiB in "
             f"fp32), 2 Ray Train workers of 1 CPU, fp32, 3 steps of 4 x 64 tokens, a checkpoint at step 3. Peak "
             f"resident memory per worker (GiB, rank 0 / rank 1) in each phase (steady: whatever ran "
             f"outside the others, mostly steps 2-3 and the evals):", "",
             "| run | RSS before build | " + " | ".join(phases) + " | rank 1's save: its peak - RSS before it "
             "(x fp32 model) |", "|---" * (len(phases) + 3) + "|"]
    for name, run in peaks.items():
        table.append(f"| {name} | {gib(run['build_entry'])} | " + " | ".join(gib(run.get(p, [])) for p in phases)
                     + f" | {added(run, 'save', 1):+.2f} |")
    table += ["",
              f"- ZeRO-3 over ZeRO-0, max over ranks: build peak **{max(zero3['build']) / max(zero0['build']):.2f}**"
              f" (whole model: {max(whole['build']) / max(zero0['build']):.2f}; goal <= 0.6); peak through the "
              f"engine's construction **{through_engine(zero3) / through_engine(zero0):.2f}** (whole model: "
              f"{through_engine(whole) / through_engine(zero0):.2f}), where ZeRO-3's engine allocates its optimizer "
              f"state up front and ZeRO-0's at the first step.",
              f"- ZeRO-3's rank 1 at save: peak - steady-state peak = "
              f"**{(zero3['save'][1] - zero3['steady'][1]) / fp32:+.2f}** x the fp32 model, and it added "
              f"**{added(zero3, 'save', 1):+.2f}** x to what it held before the save (whole model: "
              f"{(whole['save'][1] - whole['steady'][1]) / fp32:+.2f} and {added(whole, 'save', 1):+.2f}; goal <= "
              f"+0.10).",
              f"- Resumed at step 3 and run to 5, against 5 steps uninterrupted: losses at steps 4 and 5 "
              f"{[round(losses['resumed_losses'][s], 6) for s in (4, 5)]} vs "
              f"{[round(losses['uninterrupted_losses'][s], 6) for s in (4, 5)]}, largest gap {gap:.2e} (goal <= "
              f"1e-3); the resumed run's peaks (GiB): " + ", ".join(
                  f"{p} {gib(v)}" for p, v in record["resumed_peak_bytes"].items() if not p.endswith("_entry")) + ".",
              f"- The saved hf/ folder loads: transformers continues `12+34=` with {record['loads']['transformers']!r},"
              f" vLLM with {record['loads']['vllm']!r}."]
    if "planned_bytes" in record:
        table += ["", f"The memory plan (`--plan`, rayloop/plan.py, at commit {record['planned_at']}) against the "
                      f"measured steady-state peak, max over ranks (goal: within 25%):", "", "| run | plan (GiB) | measured (GiB) | plan / measured |",
                  "|---|---|---|---|"]
        for run, planned in record["planned_bytes"].items():
            measured = max(peaks[run]["steady"])
            table.append(f"| {run} | {planned / GIB:.2f} | {measured / GIB:.2f} | {planned / measured:.2f} |")
    return table

if __name__ == "__main__":
    main()
