"""Benchmark: rayloop's pretraining step against what the machine does with the same model, and ZeRO's memory.

    .venv/bin/python bench/pretrain.py                      # CPU: `small` preset (25.5M), fp32 and bf16
    .venv/bin/python bench/pretrain.py --preset 125m --gpu  # a GPU machine (one GPU per worker)

Same model, batch order and tokens per optimizer step (global batch x seq_len) everywhere; forward, backward,
gradient clipping and an AdamW step; tokens/s over the steps after `--warmup`. On CPUs both sides step torch's fused
AdamW kernel (an override in rayloop, whose default is torch's per-tensor loop) unless `--adamw default`; on GPUs
rayloop steps DeepSpeed's FusedAdam and `--adamw` sets the plain loop's only.
(a) The machine's practical limit, one process using every core (or one GPU): a plain PyTorch loop, in fp32 and
    under `torch.autocast(bfloat16)`; and a GEMM peak (2048x2048 matmul, fp32 and bf16) measured on the spot,
    against which every figure's MFU (6 x parameters x tokens/s, attention ignored) is given.
(b) rayloop's loop (jobs.pretrain's batch order, DeepSpeed ZeRO-2 engine from rayloop.train.deepspeed_config) under
    Ray Train and under torchrun, same worker count. Each of `--repeats` rounds runs the plain loop, torchrun, Ray
    Train and (c) once per precision, and each ratio is the mean of the rounds' own ratios, so drift on a shared
    machine hits both sides of one. In fp32 and in bf16 as rayloop applies it (autocast on CPUs, DeepSpeed's bf16
    mode on GPUs), plus DeepSpeed's other bf16 form under torchrun (bf16 weights on a CPU, autocast on a GPU).
    Goals: Ray Train / torchrun >= 0.97; rayloop bf16 / plain bf16 >= 0.8 where the machine computes bf16 natively.
(c) Worker layout and ZeRO stage on CPUs: one Ray Train worker holding every CPU (torch threads = CPUs; ZeRO-0, as
    one worker has nothing to shard), and the workers of (b) with ZeRO-0 (each all-reduces the gradients and steps
    the whole model) against (b)'s ZeRO-2.
(d) Bytes per worker of parameters + optimizer state after one step, ZeRO-0 vs ZeRO-3 (goal: <= 1/N + 10%).
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


def _timed(args: dict, step, sync) -> float:
    """tokens/s of `step(i)` over the timed steps, after the warm-up ones."""
    for i in range(args["warmup"]):
        step(i)
    sync()
    started = time.perf_counter()
    for i in range(args["warmup"], args["warmup"] + args["steps"]):
        step(i)
    sync()
    return args["steps"] * args["global_batch"] * args["seq_len"] / (time.perf_counter() - started)


def _blocks(args: dict, tokenizer):
    from rayloop.data import pack_blocks
    from rayloop.tasks import ArithmeticTask

    return pack_blocks(ArithmeticTask().pretrain_corpus(), tokenizer, args["seq_len"])


def _plain_loop(args: dict) -> dict:
    """One process, plain PyTorch: the model, torch's AdamW, autocast for bf16; every core (or one GPU)."""
    import torch

    from jobs.pretrain import batch_at
    from rayloop.models import load_model

    torch.manual_seed(0)
    device = "cuda" if args["gpu"] else "cpu"
    model, tokenizer = load_model(args["model_dir"])
    model.to(device).train()
    blocks = _blocks(args, tokenizer)
    # `--adamw fused`: torch's fused kernel, the fastest AdamW it has on CPUs and GPUs.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0,
                                  fused=args["adamw"] == "fused" or None)

    def step(i):
        batch = batch_at(blocks, i, args["global_batch"], 0).to(device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=args["precision"] == "bf16"):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    tokens_per_s = _timed(args, step, torch.cuda.synchronize if args["gpu"] else lambda: None)
    return {"tokens_per_s": tokens_per_s, "torch_threads": torch.get_num_threads()}


def _gemm_peak(args: dict) -> dict:
    """FLOP/s of a 2048x2048 matmul in fp32 and in bf16, best of 5 timed rounds, on what the plain loop uses."""
    import torch

    device, n = ("cuda" if args["gpu"] else "cpu"), 2048
    sync = torch.cuda.synchronize if args["gpu"] else (lambda: None)
    peaks = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        reps, best = (50 if args["gpu"] else 3), 0.0
        torch.mm(a, b)
        for _ in range(5):
            sync()
            started = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b)
            sync()
            best = max(best, 2 * n**3 * reps / (time.perf_counter() - started))
        peaks[name] = best
    return {"flops": peaks, "torch_threads": torch.get_num_threads()}


def _step_loop(args: dict, rank: int, world: int, report=None) -> dict:
    """rayloop's step, identical under both launchers; `report` is Ray Train's, called every 10 steps as
    jobs.pretrain does, so its cost is inside the Ray figure."""
    import deepspeed
    import torch

    from jobs.pretrain import batch_at
    from rayloop.config import DeepSpeedSection, OptimSection
    from rayloop.models import load_model
    from rayloop.train import deepspeed_config, shard_blocks

    torch.manual_seed(0)
    model, tokenizer = load_model(args["model_dir"])
    blocks = shard_blocks(_blocks(args, tokenizer), rank, world)
    micro = args["global_batch"] // world
    # On CPUs the fused kernel is an override in rayloop (rayloop/train.py says why); GPUs step DeepSpeed's FusedAdam.
    fused = {"optimizer": {"params": {"fused": True}}} if args["adamw"] == "fused" and not args["gpu"] else {}
    config = deepspeed_config(DeepSpeedSection(zero_stage=args["zero"], overrides=fused), OptimSection(lr=1e-3),
                              micro_batch_size=micro, grad_accum=1, world_size=world,
                              total_steps=args["warmup"] + args["steps"], use_gpu=args["gpu"],
                              precision=args["precision"])
    if args.get("other_bf16_form"):  # the form of bf16 rayloop does not pick on this device
        autocast = "torch_autocast" in config
        config["bf16"], config["torch_autocast"] = {"enabled": autocast}, {"enabled": not autocast,
                                                                            "dtype": "bfloat16"}
    if config.get("torch_autocast", {}).get("enabled"):
        from rayloop.precision import logits_in_fp32

        logits_in_fp32(model)  # as jobs.pretrain does under autocast
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    n_params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    losses = []

    def step(i):
        batch = batch_at(blocks, i, micro, 0).to(engine.device)
        loss = engine(input_ids=batch, labels=batch).loss
        engine.backward(loss)
        engine.step()
        if report is not None and (i + 1) % 10 == 0:
            losses.append(loss.item())
            report({"loss": losses[-1]})

    def sync():
        if args["gpu"]:
            torch.cuda.synchronize()
        torch.distributed.barrier()

    tokens_per_s = _timed(args, step, sync)
    return {"tokens_per_s": tokens_per_s, "memory_bytes": _state_bytes(engine), "n_params": n_params,
            "torch_threads": torch.get_num_threads(),
            "param_dtype": str(next(engine.module.parameters()).dtype).replace("torch.", "")}


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


def run_ray(args: dict, workers: int, cpus_per_worker: int = 1) -> dict:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from rayloop.cluster import init_ray

    init_ray()
    # Ray gives each worker OMP_NUM_THREADS = its CPUs, so torch runs that many threads.
    trainer = TorchTrainer(_ray_worker, train_loop_config=args,
                           scaling_config=ScalingConfig(num_workers=workers, use_gpu=args["gpu"],
                                                        resources_per_worker={"CPU": cpus_per_worker}),
                           run_config=RunConfig(storage_path=tempfile.mkdtemp(prefix="bench-")))
    return trainer.fit().metrics


def run_torchrun(args: dict, workers: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={workers}",
                        __file__, "--torchrun-worker", json.dumps(args), out.name], check=True, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        return json.loads(Path(out.name).read_text())


def run_alone(kind: str, args: dict) -> dict:
    """The plain loop or the GEMM peak in a fresh process of its own, with torch's default threads (every core)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, __file__, "--alone", kind, json.dumps(args), out.name], check=True,
                       cwd=ROOT, env=env)
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
    parser.add_argument("--repeats", type=int, default=1, help="rounds, each of every figure but the GEMM and (d)")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--adamw", choices=("fused", "default"), default="fused",
                        help="torch's AdamW kernel on both sides on CPUs (the plain loop's only on GPUs): fused, "
                             "or torch's default")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "pretrain.json"))
    opts = parser.parse_args()

    from rayloop.models import create_model_folder
    from rayloop.precision import device_bf16
    from rayloop.tasks import ArithmeticTask

    model_dir = tempfile.mkdtemp(prefix="bench-model-")
    create_model_folder(opts.preset, ArithmeticTask().pretrain_corpus(), model_dir)
    args = {"model_dir": model_dir, "seq_len": opts.seq_len, "global_batch": opts.global_batch, "zero": 2,
            "warmup": opts.warmup, "steps": opts.steps, "gpu": opts.gpu, "adamw": opts.adamw}
    precisions = ("fp32", "bf16")
    native, device = device_bf16(opts.gpu)

    gemm = run_alone("gemm", args)
    # Every round measures each figure once, the plain loop and the one-worker layout too, so each ratio is taken
    # between runs minutes apart: on a shared machine one process's speed drifts by 10-20% within the hour.
    names = ("plain", "torchrun", "ray_train") + (() if opts.gpu else ("one_worker", "ray_train_zero0"))
    runs: dict = {p: {name: [] for name in names} for p in precisions}
    threads = {}
    for _ in range(opts.repeats):
        for p in precisions:
            result = run_alone("plain", {**args, "precision": p})
            runs[p]["plain"].append(result["tokens_per_s"])
            threads["plain"] = result["torch_threads"]
            for name, run in (("torchrun", run_torchrun), ("ray_train", run_ray)):
                result = run({**args, "precision": p}, opts.workers)
                runs[p][name].append(result["tokens_per_s"])
                threads[name] = result["torch_threads"]
            if not opts.gpu:
                # One worker has nothing to shard: ZeRO-0, as one would configure it (ZeRO-2 adds DeepSpeed's flat
                # buffers).
                result = run_ray({**args, "precision": p, "zero": 0}, 1, cpus_per_worker=os.cpu_count())
                runs[p]["one_worker"].append(result["tokens_per_s"])
                threads["one_worker"] = result["torch_threads"]
                result = run_ray({**args, "precision": p, "zero": 0}, opts.workers)
                runs[p]["ray_train_zero0"].append(result["tokens_per_s"])
                threads["ray_train_zero0"] = result["torch_threads"]
    other_form = run_torchrun({**args, "precision": "bf16", "other_bf16_form": True}, opts.workers)
    memory = {z: run_torchrun({**args, "precision": "fp32", "zero": z, "steps": 1, "warmup": 1}, opts.workers)
              for z in (0, 3)}
    n_params = memory[0]["n_params"]

    # A CPU run's workers share the cores the plain loop and the GEMM peak used (a fair comparison where
    # workers x 1 CPU = the machine's CPUs, as by default on 2 cores); on GPUs each worker has its own.
    devices = opts.workers if opts.gpu else 1

    def mfu(tokens_per_s: float, precision: str, n_devices: int = devices) -> float:
        return 6 * n_params * tokens_per_s / (gemm["flops"][precision] * n_devices)

    mean = {p: {k: sum(v) / len(v) for k, v in runs[p].items()} for p in precisions}

    def round_ratios(over: str, under: str, scale: float = 1.0) -> dict:
        """Per precision, the ratio within each round (runs minutes apart) and their mean, not a ratio of means."""
        rounds = {p: [a / scale / b for a, b in zip(runs[p][over], runs[p][under])] for p in precisions}
        return {p: {"mean": sum(r) / len(r), "rounds": r} for p, r in rounds.items()}

    ratio_mem = memory[3]["memory_bytes"] / memory[0]["memory_bytes"]
    results = {
        "machine": f"{os.cpu_count()} CPUs" + (", GPU" if opts.gpu else ", no GPU") + f"; {device}",
        "auto_bf16": native,  # what deepspeed.precision=auto picks here (flags, then a timed matmul)
        "preset": opts.preset, "parameters": n_params, "workers": opts.workers, "seq_len": opts.seq_len,
        "global_batch": opts.global_batch, "timed_steps": opts.steps, "zero_stage": 2, "adamw": opts.adamw,
        "gemm_peak_flops": gemm["flops"], "gemm_torch_threads": gemm["torch_threads"],
        "tokens_per_s": runs,
        "torch_threads_per_process": threads,
        "ratio_ray_over_torchrun": round_ratios("ray_train", "torchrun"),
        "ratio_rayloop_over_plain": round_ratios("ray_train", "plain", devices),
        "ratio_one_worker_over_plain": {} if opts.gpu else round_ratios("one_worker", "plain"),
        "ratio_zero0_over_plain": {} if opts.gpu else round_ratios("ray_train_zero0", "plain"),
        "bf16_speedup": {k: mean["bf16"][k] / mean["fp32"][k] for k in names},
        "other_bf16_form_torchrun": {"form": "autocast" if opts.gpu else "bf16 weights",
                                     "tokens_per_s": other_form["tokens_per_s"],
                                     "param_dtype": other_form["param_dtype"]},
        "mfu": {k: {p: mfu(mean[p][k], p, 1 if k in ("plain", "one_worker") else devices) for p in precisions}
                for k in names},
        "memory_per_worker_bytes": {"zero0": memory[0]["memory_bytes"], "zero3": memory[3]["memory_bytes"]},
        "memory_ratio_zero3_over_zero0": ratio_mem,
        "memory_goal": 1 / opts.workers + 0.10,
    }
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"\n{results['machine']}; auto picks bf16: {native}. {opts.preset} ({n_params / 1e6:.1f}M), "
          f"{opts.global_batch} x {opts.seq_len} tokens per step")
    gflops = {p: gemm["flops"][p] / 1e9 for p in precisions}
    print(f"(a) GEMM peak  fp32 {gflops['fp32']:.0f} GFLOP/s  bf16 {gflops['bf16']:.0f} GFLOP/s "
          f"({gemm['torch_threads']} threads); {opts.repeats} round(s), each ratio the mean of the rounds' ratios")

    def rounds(key: str, p: str) -> str:
        return "/".join(f"{r:.3f}" for r in results[key][p]["rounds"])

    for p in precisions:
        print(f"    plain loop {p}: {mean[p]['plain']:.0f} tokens/s, MFU {results['mfu']['plain'][p]:.1%}")
    for p in precisions:
        print(f"(b) {p}: torchrun {mean[p]['torchrun']:.0f}  Ray Train {mean[p]['ray_train']:.0f} tokens/s "
              f"(MFU {results['mfu']['ray_train'][p]:.1%})  Ray/torchrun "
              f"{results['ratio_ray_over_torchrun'][p]['mean']:.3f} ({rounds('ratio_ray_over_torchrun', p)}; "
              f"goal >= 0.97)  rayloop/plain {results['ratio_rayloop_over_plain'][p]['mean']:.3f} "
              f"({rounds('ratio_rayloop_over_plain', p)}" + ("; goal >= 0.8)" if p == "bf16" else ")"))
    print(f"    bf16 speed-up (means): plain {results['bf16_speedup']['plain']:.2f}x, rayloop "
          f"{results['bf16_speedup']['ray_train']:.2f}x; DeepSpeed's other bf16 form "
          f"({results['other_bf16_form_torchrun']['form']}) under torchrun: {other_form['tokens_per_s']:.0f} tokens/s")
    for p in results["ratio_one_worker_over_plain"]:
        print(f"(c) {p}: 1 Ray Train worker x {os.cpu_count()} CPUs, ZeRO-0 {mean[p]['one_worker']:.0f} tokens/s "
              f"(rayloop/plain {results['ratio_one_worker_over_plain'][p]['mean']:.3f}, "
              f"{rounds('ratio_one_worker_over_plain', p)}); {opts.workers} x 1 CPU, ZeRO-0 "
              f"{mean[p]['ray_train_zero0']:.0f} (rayloop/plain {results['ratio_zero0_over_plain'][p]['mean']:.3f}, "
              f"{rounds('ratio_zero0_over_plain', p)}); ZeRO-2 {mean[p]['ray_train']:.0f}")
    print(f"(d) params+optimizer per worker  ZeRO-0 {memory[0]['memory_bytes'] / 2**20:.1f} MiB  "
          f"ZeRO-3 {memory[3]['memory_bytes'] / 2**20:.1f} MiB  ratio {ratio_mem:.3f} "
          f"(goal <= {results['memory_goal']:.2f})")


def _alone(kind: str, args: dict, out: str) -> None:
    Path(out).write_text(json.dumps(_gemm_peak(args) if kind == "gemm" else _plain_loop(args)))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--torchrun-worker":
        _torchrun_worker(json.loads(sys.argv[2]), sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "--alone":
        _alone(sys.argv[2], json.loads(sys.argv[3]), sys.argv[4])
    else:
        main()
