"""Benchmark: pretraining's data path, streamed through Ray Data against the whole corpus in each worker's memory.

    .venv/bin/python bench/data.py              # 50 MB and 500 MB of generated text, `small` preset, 2 CPU workers

The real job (jobs.pretrain, Ray Train, 2 workers, ZeRO-2) on a generated text corpus (`data.source=text`, one
document per line) of ~50 MB ("1x") and ~500 MB ("10x", whose first file is the 1x corpus, so both train the same
tokenizer). For each run: every worker's peak resident memory over all its phases (rayloop.memory) and the job's
tokens/s (`--steps` steps of 32 x 64 tokens).
- `ray_data` at 1x and 10x: the worker's peak must not grow with the corpus (goal: 10x within +10% of 1x).
- `in_memory` at 1x, in rounds alternating with `ray_data` at 1x: tokens/s against the loader that holds every
  block in memory (goal: streamed within 5%). The in-memory loader is not run at 10x: each worker would hold the
  500 MB of text and its token ids as Python objects, several GiB a worker.
Figures go to bench/results/data.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "platform"), str(ROOT / "bench")]

GIB, MB = 2**30, 10**6
WORDS = ("the a of to and in is was for on that with as by at from it an be this which or are had not but what all "
         "were when we there can more if out so said each she do how their will up other about many then them these "
         "would like him into time has look two write go see number way could people my than first water been call "
         "who oil its now find long down day did get come made may part model train data layer token stream block "
         "memory worker cluster shard seed epoch step loss ray node disk").split()


def write_corpus(folder: Path, megabytes: int, seed: int = 0) -> int:
    """Files of ~50 MB of one-sentence documents under `folder`; returns the bytes written. The same seed writes
    the same files, so a 10x corpus starts with the 1x one."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, written, index = random.Random(seed), 0, 0
    sentences = [" ".join(rng.choices(WORDS, k=rng.randint(8, 24))) for _ in range(20_000)]
    for file_number in range(-(-megabytes // 50)):
        lines, size = [], 0
        while size < 50 * MB and written + size < megabytes * MB:
            line = f"document {index}: {sentences[rng.randrange(len(sentences))]}."
            lines.append(line)
            size += len(line) + 1
            index += 1
        (folder / f"part-{file_number:03d}.txt").write_text("\n".join(lines) + "\n")
        written += size
    return written


def _pretrain(work: Path, name: str, corpus: Path, loader: str, steps: int) -> dict:
    import logging

    import ray

    from jobs import pretrain
    from rayloop.cluster import local_num_cpus, runtime_env
    from rayloop.config import RaySection, load_config

    ray.shutdown()
    # The workers' allocator as a job's (bench/memory.py lowers glibc's mmap threshold to see each phase's own peak;
    # here its system calls would cost the steps whose speed is measured).
    ray.init(address="local", num_cpus=local_num_cpus(None), object_store_memory=RaySection().object_store_memory_mb
             * 2**20, include_dashboard=True, dashboard_host="127.0.0.1", runtime_env=runtime_env(),
             logging_level=logging.WARNING)
    cfg = load_config(pretrain.PretrainConfig, [
        "--model.name_or_path=small", f"--storage.path={work}", f"--storage.name={name}", "--data.source=text",
        f"--data.path={corpus}", f"--data.loader={loader}", f"--train.steps={steps}",
        f"--train.checkpoint_every={steps}", "--train.log_every=10", "--train.keep_checkpoints=1",
        "--registry.enabled=false"])
    started = time.perf_counter()
    summary = pretrain.main(cfg)
    peaks = summary["memory_peak_bytes"]
    record = {"loader": loader, "tokens_per_s": summary["tokens_per_s"], "wall_s": time.perf_counter() - started,
              "peak_bytes": [max(peaks[p][rank] for p in peaks if not p.endswith("_entry")) for rank in (0, 1)],
              "phase_peak_bytes": {p: v for p, v in peaks.items() if not p.endswith("_entry")},
              "eval_loss": summary["eval_loss"], "precision": summary["precision"]}
    shutil.rmtree(work / name, ignore_errors=True)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=50, help="size of the 1x corpus")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of in_memory vs ray_data at 1x")
    args = parser.parse_args()
    from results_io import commit, write_results

    code = commit()
    work = Path(tempfile.mkdtemp(prefix="rayloop-data-"))
    try:
        sizes = {"1x": write_corpus(work / "1x", args.megabytes), "10x": write_corpus(work / "10x", 10 * args.megabytes)}
        runs = {"ray_data 10x": _pretrain(work, "stream-10x", work / "10x", "ray_data", args.steps)}
        for i in range(args.rounds):
            for loader in ("in_memory", "ray_data"):
                runs[f"{loader} 1x round {i + 1}"] = _pretrain(work, f"{loader}-{i}", work / "1x", loader, args.steps)
                print(json.dumps(runs[f"{loader} 1x round {i + 1}"]), flush=True)
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    record = {"corpus_bytes": sizes, "steps": args.steps, "runs": runs}
    table = render(record)
    write_results("data", record, table, command=" ".join(["bench/data.py", *sys.argv[1:]]), code=code)
    print("\n".join(table))


def render(record: dict) -> list[str]:
    runs = record["runs"]

    def gib(values):
        return " / ".join(f"{b / GIB:.2f}" for b in values)

    ones = [r for k, r in runs.items() if k.startswith("ray_data 1x")]
    stream_1x = max(max(r["peak_bytes"]) for r in ones)
    stream_10x = max(runs["ray_data 10x"]["peak_bytes"])
    ratios = [runs[f"ray_data 1x round {i}"]["tokens_per_s"] / runs[f"in_memory 1x round {i}"]["tokens_per_s"]
              for i in range(1, len(ones) + 1)]
    precision = runs["ray_data 10x"]["precision"]
    table = [f"`small` preset, 2 Ray Train workers of 1 CPU, ZeRO-2, {precision} (`auto` chose it), "
             f"{record['steps']} steps of 32 x 64 tokens on generated text: {record['corpus_bytes']['1x'] / MB:.0f} MB "
             f"(1x) and {record['corpus_bytes']['10x'] / MB:.0f} MB (10x). Peak resident memory per worker over every "
             f"phase (GiB, rank 0 / rank 1):", "",
             "| run | peak (GiB) | data phase (GiB) | tokens/s | wall (s) |", "|---|---|---|---|---|"]
    for name, run in runs.items():
        table.append(f"| {name} | {gib(run['peak_bytes'])} | {gib(run['phase_peak_bytes']['data'])} | "
                     f"{run['tokens_per_s']:.0f} | {run['wall_s']:.0f} |")
    table += ["", f"- Streamed, 10x over 1x corpus: peak {stream_10x / stream_1x:.3f}x (goal <= 1.10).",
              f"- Streamed over in-memory tokens/s, per round: {', '.join(f'{r:.3f}' for r in ratios)}; mean "
              f"{statistics.mean(ratios):.3f} (goal >= 0.95)."]
    return table


if __name__ == "__main__":
    main()
