"""Which floating-point format training computes in: bf16 where the hardware multiplies it natively, else fp32.

`deepspeed.precision: auto` picks bf16 on a GPU that supports it and on a CPU with native bf16 instructions
(AVX512-BF16 or AMX on x86, the BF16 extension on Arm) whose bf16 matrix multiplications it measures to run at least
1.5x as fast as fp32 ones; fp32 elsewhere. A CPU without them still runs bf16, but emulated, and slower than fp32:
on 2 threads of an AVX-512 Xeon without AVX512-BF16 a 2048x2048 GEMM ran at 315 GFLOP/s in fp32 and 62 in bf16
(bench/pretrain.py), where a Xeon with AMX ran 207-292 and 646-1079 (four runs on two days). The flags alone do not
settle it: a 2-core Xeon VM with AVX512-BF16 and no AMX ran the GEMM at 317 GFLOP/s in fp32 and 167 in bf16, and the
bench's plain training loop at 1,368 and 670 tokens/s, so each CPU with the flags times a matmul in both formats
(`bf16_matmul_speedup`, ~0.2 s) before bf16 is chosen.
`bf16`/`fp32` force either.

Each worker looks at its own device and the group takes the lowest: every rank must train in one format, and the
driver's node may be of another kind than the workers' (a CPU head node in front of GPU workers).

How bf16 is applied (`deepspeed_precision`), in pretraining and the TRL jobs alike: on a GPU, DeepSpeed's bf16
mode (bf16 weights, fp32 master copy and optimizer state; the Trainer's `bf16=True`), the usual layout, which halves
weight memory. On a CPU, DeepSpeed's `torch_autocast`: weights, gradients, optimizer state and checkpoints stay
fp32; torch's CPU autocast runs the matrix multiplications (linear layers, attention) in bf16 on oneDNN's
AVX512-BF16/AMX kernels, where a CPU's bf16 speed is, and keeps the residual stream, norms, softmax and loss in
fp32 (with ZeRO stage 1 or more DeepSpeed also reduces the linear layers' gradients in bf16); pretraining keeps
its logits in fp32 too (`logits_in_fp32`). The numerics decide it: from the same pretrained model, 2000 steps of
the demo's SFT reached 8.2% held-out exact match with bf16 weights and 93.1% with autocast.
"""

from __future__ import annotations

import functools
import os
import platform
import types
from pathlib import Path
from typing import Any

BF16, FP32 = "bf16", "fp32"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, Arm
            return set(value.split())
    return set()


def cpu_bf16() -> tuple[bool, str]:
    """Whether this process's CPU computes bf16 natively, and what was found, for the job's message.
    RAYLOOP_CPU_BF16=1/0 overrides the detection (a CPU it does not know; the test suite's bf16 path on a CPU
    without bf16). It is read where the worker runs: Ray workers inherit the environment their node's Ray was
    started with (for a local cluster, the job's own)."""
    import torch

    told = os.environ.get("RAYLOOP_CPU_BF16", "")
    if told in ("0", "1"):
        return told == "1", f"CPU {'with' if told == '1' else 'without'} native bf16 (RAYLOOP_CPU_BF16={told})"
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64", "i686"):
        # torch's cpuinfo checks, not oneDNN's `_is_mkldnn_bf16_supported`, which says True for any AVX-512 CPU
        # (it can emulate bf16, slowly).
        found = [name for name, check in (("AVX512-BF16", "_is_avx512_bf16_supported"),
                                          ("AMX", "_is_amx_tile_supported"))
                 if getattr(torch.cpu, check, lambda: False)()]
        if found:
            return _measured(f"CPU with {' and '.join(found)}")
        return False, "CPU without AVX512-BF16 or AMX"
    if machine in ("aarch64", "arm64"):
        if "bf16" in _cpu_flags():
            return _measured("Arm CPU with BF16")
        return False, "Arm CPU without the BF16 extension"
    return False, f"{machine} CPU (native bf16 not known)"


# bf16 autocast pays for its casts only where bf16 matmuls are well ahead: with AMX the GEMM ran 3.1x fp32 and the
# bench's training loop 1.5x; at 0.5x (the AVX512-BF16 VM above) the loop ran at half speed.
BF16_MIN_SPEEDUP = 1.5


def _measured(cpu: str) -> tuple[bool, str]:
    speedup = bf16_matmul_speedup()
    if speedup < BF16_MIN_SPEEDUP:
        return False, f"{cpu}, but bf16 matmuls ran {speedup:.2f}x fp32's speed here (bf16 needs {BF16_MIN_SPEEDUP}x)"
    return True, f"{cpu} (bf16 matmuls {speedup:.2f}x fp32)"


@functools.cache
def bf16_matmul_speedup(n: int = 1024, runs: int = 5) -> float:
    """How many times faster a bf16 n x n matmul runs than an fp32 one, on this process's threads: the best of `runs`
    timings each, after one call per format that lets oneDNN pick its kernel. The formats alternate, so that load
    from a neighbour (another worker measuring on the same cores) falls on both alike."""
    import time

    import torch

    generator = torch.Generator().manual_seed(0)  # leaves the global generator to the job's seeding
    pairs = {dtype: tuple(torch.randn(n, n, generator=generator).to(dtype) for _ in range(2))
             for dtype in (torch.float32, torch.bfloat16)}
    timings: dict = {dtype: [] for dtype in pairs}
    for _ in range(runs + 1):
        for dtype, (a, b) in pairs.items():
            started = time.perf_counter()
            torch.mm(a, b)
            timings[dtype].append(time.perf_counter() - started)
    fp32, bf16 = (min(timings[dtype][1:]) for dtype in (torch.float32, torch.bfloat16))  # [0]: the kernel's pick
    return fp32 / bf16


def device_bf16(use_gpu: bool) -> tuple[bool, str]:
    """Whether this process's training device computes bf16 natively, and what it is."""
    import torch

    if use_gpu and torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        if torch.cuda.is_bf16_supported(including_emulation=False):  # a V100 or T4 only emulates it
            return True, name
        return False, f"{name} (no bf16)"
    return cpu_bf16()


def choose(setting: str, use_gpu: bool) -> tuple[str, str]:
    """(precision, why) for this process: `setting` when forced, else by its device."""
    if setting != "auto":
        return setting, f"deepspeed.precision={setting}"
    native, device = device_bf16(use_gpu)
    return (BF16 if native else FP32), f"auto: {device}"


def agreed(setting: str, use_gpu: bool) -> tuple[str, str]:
    """`choose` agreed by every rank of the process group (every rank must call it): fp32 if any rank chose it (its
    device lacks native bf16 or measured it slow), naming the first."""
    import torch.distributed as dist

    mine = choose(setting, use_gpu)
    if setting != "auto" or not dist.is_initialized() or dist.get_world_size() == 1:
        return mine
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if len({precision for precision, _ in everyone}) == 1:  # alike (measured speed-ups differ in their digits)
        return everyone[0]
    rank, why = next((rank, why) for rank, (precision, why) in enumerate(everyone) if precision != BF16)
    return FP32, f"{why} (worker {rank})"


def describe(precision: str, why: str, *, autocast: bool) -> str:
    """One line for the job's user; `autocast`: bf16 is applied as autocast, not as bf16 weights."""
    if precision == FP32:
        how = "fp32"
    elif autocast:
        how = "bf16 (autocast: bf16 matrix multiplications, fp32 weights)"
    else:
        how = "bf16 (bf16 weights, fp32 master copy)"
    hint = " (deepspeed.precision=bf16 forces bf16)" if precision == FP32 and why.startswith("auto") else ""
    return f"training in {how}, {why}{hint}"


def deepspeed_precision(precision: str, use_gpu: bool) -> dict[str, Any]:
    """DeepSpeed config keys for `precision` on this device (see the module's docstring)."""
    if precision != BF16:
        return {"bf16": {"enabled": False}}
    if use_gpu:
        return {"bf16": {"enabled": True}}
    return {"bf16": {"enabled": False}, "torch_autocast": {"enabled": True, "dtype": "bfloat16"}}


def _fp32_linear(self, hidden):
    import torch

    with torch.autocast(hidden.device.type, enabled=False):
        return torch.nn.functional.linear(hidden.float(), self.weight, self.bias)


def logits_in_fp32(model) -> None:
    """Under CPU autocast, compute a causal LM's logits in fp32 (its output layer outside autocast), as mixed
    precision recipes do: autocast would round them to bf16, about 3 significant digits. The output layer is a
    small share of the FLOPs (1% of the `small` preset's). In the suite's DPO test run all in bf16, pretraining
    with bf16 logits left DPO at 57% held-out preference accuracy, and with fp32 logits at 100% (one run each).
    A model without a linear output layer is left as it is. For pretraining: the TRL trainers compute
    log-probabilities in a fused head of their own, from the weight, which this does not reach.
    """
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, torch.nn.Linear):
        head.forward = types.MethodType(_fp32_linear, head)


def autocast_bare_calls(model) -> None:
    """Run `model`'s own forward under CPU bf16 autocast, for the TRL jobs. DeepSpeed autocasts only the calls made
    through its engine, and TRL also calls the bare model: evaluation, GRPO's and RLOO's old log-probabilities,
    DPO's evaluation of the policy. Those must compute as training does: a policy ratio between fp32 and bf16
    log-probabilities is not 1 on-policy, and clipping would act on precision noise."""
    import torch

    function = model.forward.__func__  # TRL may have bound a forward of its own (its fused LM head)

    @functools.wraps(function)  # `generate` checks its keywords against the forward's signature
    def under_autocast(self, *args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return function(self, *args, **kwargs)

    # Bound, not a closure over this model: a deep copy (a reference model) then runs its own weights.
    model.forward = types.MethodType(under_autocast, model)
