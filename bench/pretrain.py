"""Benchmark: the DeepSpeed training step under Ray Train vs under torchrun, and ZeRO-0 vs ZeRO-3 memory.

    .venv/bin/python bench/pretrain.py                      # CPU: `small` preset (~28M), 2 workers
    .venv/bin/python bench/pretrain.py --preset 125m --gpu  # a GPU machine: bf16, reports MFU too

(a) tokens/s of the same loop (jobs.pretrain's batch order, DeepSpeed engine from rayloop.train.deepspeed_config,
    ZeRO-2) started by Ray Train's TorchTrainer and by torchrun with the same worker count; runs interleaved
    (torchrun, Ray, torchrun, Ray) so drift on a shared machine hits both. Ratio = Ray / torchrun (goal >= 0.97).
(b) bytes per worker of parameters + optimizer state (unique tensor storages, after one step) under ZeRO-0 and
    ZeRO-3 (goal: ZeRO-3 <= 1/N + 10% of ZeRO-0).
Figures go to bench/results/pretrain.json and are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "platform")]


def _step_loop(args: dict, rank: int, world: int, report=None) -> dict:
    """Warm-up, then timed optimizer steps. Identical under both launchers; `report` is Ray Train's, called every
    10 steps as jobs.pretrain does, so its cost is inside the Ray figure."""
    import deepspeed
    import torch

    from jobs.pretrain import batch_at
    from rayloop.config import DeepSpeedSection, OptimSection
    from rayloop.data import pack_blocks
    from rayloop.models import load_model
    from rayloop.tasks import ArithmeticTask
    from rayloop.train import deepspeed_config, shard_blocks

    torch.manual_seed(0)
    model, tokenizer = load_model(args["model_dir"])
    blocks = shard_blocks(pack_blocks(ArithmeticTask().pretrain_corpus(), tokenizer, args["seq_len"]), rank, world)
    micro = args["global_batch"] // world
    ds = DeepSpeedSection(zero_stage=args["zero"], precision="bf16" if args["gpu"] else "fp32")
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(),
        config=deepspeed_config(ds, OptimSection(lr=1e-3), micro_batch_size=micro, grad_accum=1, world_size=world,
                                total_steps=args["warmup"] + args["steps"], use_gpu=args["gpu"]))
    n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())

    def step(i):
        batch = batch_at(blocks, i, micro, 0).to(engine.device)
        loss = engine(input_ids=batch, labels=batch).loss
        engine.backward(loss)
        engine.step()
        return loss

    for i in range(args["warmup"]):
        step(i)
    if args["gpu"]:
        torch.cuda.synchronize()
    torch.distributed.barrier()
    started = time.perf_counter()
    for i in range(args["warmup"], args["warmup"] + args["steps"]):
        loss = step(i)
        if report is not None and (i + 1) % 10 == 0:
            report({"loss": loss.item()})
    if args["gpu"]:
        torch.cuda.synchronize()
    torch.distributed.barrier()
    elapsed = time.perf_counter() - started
    tokens = args["steps"] * args["global_batch"] * args["seq_len"]
    return {"tokens_per_s": tokens / elapsed, "memory_bytes": _state_bytes(engine), "n_params": n_params,
            "torch_threads": torch.get_num_threads()}


def _state_bytes(engine) -> int:
    """Bytes of the unique tensor storages this rank holds for parameters (ZeRO-3: its partitions) and optimizer
    state (master copies, moments)."""
    import torch

    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.numel() and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()

    for p in engine.module.parameters():
        add(p.ds_tensor if hasattr(p, "ds_tensor") else p.data)
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    for group in optimizer.param_groups:
        for p in group["params"]:
            add(p)
    for state in optimizer.state.values():
        for value in state.values():
            add(value)
    return total


def _ray_worker(args: dict) -> None:
    import ray.train

    ctx = ray.train.get_context()
    result = _step_loop(args, ctx.get_world_rank(), ctx.get_world_size(), report=ray.train.report)
    # Ray Train V2 attaches metrics to checkpoints only: an empty one carries the figures to the driver.
    with tempfile.TemporaryDirectory() as tmp:
        ray.train.report(result, checkpoint=ray.train.Checkpoint.from_directory(tmp) if ctx.get_world_rank() == 0
                         else None)


def run_ray(args: dict, workers: int) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rayloop.cluster import init_ray

    init_ray()
    trainer = TorchTrainer(_ray_worker, train_loop_config=args,
                           scaling_config=ScalingConfig(num_workers=workers, use_gpu=args["gpu"]),
                           run_config=RunConfig(storage_path=tempfile.mkdtemp(prefix="bench-")))
    return trainer.fit().metrics


def run_torchrun(args: dict, workers: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={workers}",
                        __file__, "--torchrun-worker", json.dumps(args), out.name], check=True, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        return json.loads(Path(out.name).read_text())


def _torchrun_worker(args: dict, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("nccl" if args["gpu"] else "gloo")
    if args["gpu"]:
        import torch

        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    result = _step_loop(args, dist.get_rank(), dist.get_world_size())
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "pretrain.json"))
    opts = parser.parse_args()

    from rayloop.models import create_model_folder
    from rayloop.tasks import ArithmeticTask

    model_dir = tempfile.mkdtemp(prefix="bench-model-")
    create_model_folder(opts.preset, ArithmeticTask().pretrain_corpus(), model_dir)
    args = {"model_dir": model_dir, "seq_len": opts.seq_len, "global_batch": opts.global_batch, "zero": 2,
            "warmup": opts.warmup, "steps": opts.steps, "gpu": opts.gpu}

    # Ray Train pins each worker's torch threads to its CPU share (OMP_NUM_THREADS=1 per CPU); torchrun gets the same.
    runs, threads = {"torchrun": [], "ray_train": []}, {}
    for _ in range(2):
        for name, run in (("torchrun", run_torchrun), ("ray_train", run_ray)):
            result = run(args, opts.workers)
            runs[name].append(result["tokens_per_s"])
            threads[name] = result["torch_threads"]
    mean = {k: sum(v) / len(v) for k, v in runs.items()}

    memory = {z: run_torchrun({**args, "zero": z, "steps": 1, "warmup": 1}, opts.workers) for z in (0, 3)}
    ratio_mem = memory[3]["memory_bytes"] / memory[0]["memory_bytes"]
    results = {
        "machine": f"{os.cpu_count()} CPUs" + (", GPU" if opts.gpu else ", no GPU"),
        "preset": opts.preset, "parameters": memory[0]["n_params"], "workers": opts.workers,
        "seq_len": opts.seq_len, "global_batch": opts.global_batch, "timed_steps": opts.steps, "zero_stage": 2,
        "tokens_per_s": {"torchrun": runs["torchrun"], "ray_train": runs["ray_train"]},
        "torch_threads_per_worker": threads,
        "throughput_ratio_ray_over_torchrun": mean["ray_train"] / mean["torchrun"],
        "memory_per_worker_bytes": {"zero0": memory[0]["memory_bytes"], "zero3": memory[3]["memory_bytes"]},
        "memory_ratio_zero3_over_zero0": ratio_mem,
        "memory_goal": 1 / opts.workers + 0.10,
    }
    if opts.gpu:
        import torch

        peak = 989e12 if "H100" in torch.cuda.get_device_name() else 790e12
        # 6 N FLOPs per token for a forward + backward pass of an N-parameter decoder (attention term ignored).
        results["mfu_ray_train"] = 6 * results["parameters"] * mean["ray_train"] / (peak * opts.workers)
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"\n(a) tokens/s  torchrun {mean['torchrun']:.0f}  Ray Train {mean['ray_train']:.0f}  "
          f"ratio {results['throughput_ratio_ray_over_torchrun']:.3f} (goal >= 0.97)")
    print(f"(b) params+optimizer per worker  ZeRO-0 {memory[0]['memory_bytes'] / 2**20:.1f} MiB  "
          f"ZeRO-3 {memory[3]['memory_bytes'] / 2**20:.1f} MiB  ratio {ratio_mem:.3f} "
          f"(goal <= {results['memory_goal']:.2f})")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--torchrun-worker":
        _torchrun_worker(json.loads(sys.argv[2]), sys.argv[3])
    else:
        main()
