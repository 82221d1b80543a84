import pytest
import torch

from rayloop import precision


@pytest.fixture
def x86(monkeypatch):
    """An x86 CPU whose native bf16 instructions the test sets."""
    monkeypatch.delenv("RAYLOOP_CPU_BF16", raising=False)
    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")

    def cpu(avx512_bf16=False, amx=False, speedup=3.0):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        if avx512_bf16 or amx:
            monkeypatch.setattr(precision, "bf16_matmul_speedup", lambda: speedup)
        else:
            def unmeasured():
                raise AssertionError("measured bf16 on a CPU without native bf16")
            monkeypatch.setattr(precision, "bf16_matmul_speedup", unmeasured)
    return cpu


def test_auto_picks_bf16_only_where_the_cpu_has_native_bf16(x86):
    x86(avx512_bf16=True)
    assert precision.choose("auto", use_gpu=False) == ("bf16", "auto: CPU with AVX512-BF16 (bf16 matmuls 3.00x fp32)")
    x86(amx=True)
    assert precision.choose("auto", use_gpu=False)[0] == "bf16"
    # AVX-512 alone: oneDNN would run bf16 (its own check says yes), emulated and slower than fp32; nothing measured.
    x86()
    assert precision.choose("auto", use_gpu=False) == ("fp32", "auto: CPU without AVX512-BF16 or AMX")


def test_auto_keeps_fp32_where_the_cpus_bf16_measures_slow(x86):
    x86(avx512_bf16=True, speedup=0.5)
    assert precision.choose("auto", use_gpu=False) == (
        "fp32", "auto: CPU with AVX512-BF16, but bf16 matmuls ran 0.50x fp32's speed here (bf16 needs 1.5x)")
    x86(avx512_bf16=True, speedup=1.49)
    assert precision.choose("auto", use_gpu=False)[0] == "fp32"
    x86(avx512_bf16=True, speedup=precision.BF16_MIN_SPEEDUP)
    assert precision.choose("auto", use_gpu=False)[0] == "bf16"


def test_the_matmul_probe_gives_fp32_time_over_bf16_time_once_per_process(monkeypatch):
    import time

    clock = [0.0]
    calls = []

    def mm(a, b):  # bf16 matmuls take a quarter of the fp32 time, but for the first fp32 one, which the probe drops
        calls.append(a.dtype)
        clock[0] += 1.0 if a.dtype == torch.bfloat16 else (0.5 if len(calls) == 1 else 4.0)

    monkeypatch.setattr(torch, "mm", mm)
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    precision.bf16_matmul_speedup.cache_clear()
    try:
        assert precision.bf16_matmul_speedup(8) == 4.0
        assert calls == [torch.float32, torch.bfloat16] * 6  # alternating: 1 + 5 per format
        assert precision.bf16_matmul_speedup(8) == 4.0 and len(calls) == 12  # measured once per process
    finally:
        precision.bf16_matmul_speedup.cache_clear()


def test_arm_reads_the_bf16_feature(monkeypatch):
    monkeypatch.delenv("RAYLOOP_CPU_BF16", raising=False)
    monkeypatch.setattr(precision, "bf16_matmul_speedup", lambda: 2.0)
    monkeypatch.setattr(precision.platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"fp", "asimd", "bf16"})
    assert precision.choose("auto", use_gpu=False)[0] == "bf16"
    monkeypatch.setattr(precision, "_cpu_flags", lambda: {"fp", "asimd"})
    assert precision.choose("auto", use_gpu=False)[0] == "fp32"


def test_the_switch_forces_either(x86):
    x86()
    assert precision.choose("bf16", use_gpu=False) == ("bf16", "deepspeed.precision=bf16")
    x86(avx512_bf16=True)
    assert precision.choose("fp32", use_gpu=False) == ("fp32", "deepspeed.precision=fp32")


def test_workers_agree_on_fp32_when_one_lacks_bf16(monkeypatch):
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 3)
    gathered = [("bf16", "auto: CPU with AMX"), ("fp32", "auto: CPU without AVX512-BF16 or AMX"),
                ("bf16", "auto: CPU with AMX")]
    monkeypatch.setattr(dist, "all_gather_object", lambda out, mine: out.__setitem__(slice(None), gathered))
    monkeypatch.setattr(precision, "choose", lambda setting, use_gpu: gathered[0])
    assert precision.agreed("auto", use_gpu=False) == ("fp32", "auto: CPU without AVX512-BF16 or AMX (worker 1)")
    gathered[1] = ("bf16", "auto: CPU with AVX512-BF16")
    assert precision.agreed("auto", use_gpu=False) == ("bf16", "auto: CPU with AMX")
    # Every worker slow in its own measured way: fp32, without blaming one worker.
    gathered[:] = [("fp32", f"auto: CPU with AVX512-BF16, but bf16 matmuls ran 0.{i}x fp32's speed") for i in (5, 6, 7)]
    assert precision.agreed("auto", use_gpu=False) == gathered[0]


def test_a_forced_precision_calls_no_collective(monkeypatch):
    """Ranks that skip the gather together cannot deadlock; each must skip it on the config alone."""
    import torch.distributed as dist

    def no_collective(*args):
        raise AssertionError("all_gather_object called for a forced precision")

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_gather_object", no_collective)
    assert precision.agreed("bf16", use_gpu=False) == ("bf16", "deepspeed.precision=bf16")
    assert precision.agreed("fp32", use_gpu=True) == ("fp32", "deepspeed.precision=fp32")
    with pytest.raises(AssertionError, match="all_gather_object"):
        precision.agreed("auto", use_gpu=False)


def test_the_message_names_the_choice_and_the_switch():
    line = precision.describe("fp32", "auto: CPU without AVX512-BF16 or AMX", autocast=True)
    assert line == ("training in fp32, auto: CPU without AVX512-BF16 or AMX "
                    "(deepspeed.precision=bf16 forces bf16)")
    assert "autocast" in precision.describe("bf16", "auto: CPU with AMX", autocast=True)


def test_the_environment_can_tell_what_the_cpu_does(x86, monkeypatch):
    x86()
    monkeypatch.setenv("RAYLOOP_CPU_BF16", "1")
    assert precision.choose("auto", use_gpu=False) == ("bf16", "auto: CPU with native bf16 (RAYLOOP_CPU_BF16=1)")
    x86(amx=True)
    monkeypatch.setenv("RAYLOOP_CPU_BF16", "0")
    assert precision.choose("auto", use_gpu=False)[0] == "fp32"


def test_trl_jobs_bare_model_calls_run_under_autocast_and_a_copy_keeps_its_own_weights():
    import copy
    import inspect

    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=2, vocab_size=100))
    ids = torch.tensor([[1, 2, 3]])
    assert model(input_ids=ids).logits.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as DeepSpeed's engine runs the training pass
        trained = model(input_ids=ids).logits
    precision.autocast_bare_calls(model)
    # TRL's bare call (e.g. GRPO's old log-probabilities) now computes what training computes: ratio 1 on-policy.
    assert torch.equal(model(input_ids=ids).logits, trained)
    assert "input_ids" in inspect.signature(model.forward).parameters  # what `generate` validates against
    assert model.generate(ids, max_new_tokens=2, do_sample=False).shape == (1, 5)
    reference = copy.deepcopy(model)  # as TRL builds a reference model
    with torch.no_grad():
        for p in reference.parameters():
            p.zero_()
    assert reference(input_ids=ids).logits.abs().max() == 0 and model(input_ids=ids).logits.abs().max() > 0
