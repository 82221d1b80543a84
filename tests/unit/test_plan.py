"""The memory plan: DeepSpeed's own estimators agree with its model states, `--plan` prints and refuses before Ray."""

from pathlib import Path

import pytest

from rayloop.config import load_config, run_cli
from rayloop.plan import estimate, model_shape, plan_of

ROOT = Path(__file__).resolve().parents[2]
LLAMA_7B = str(ROOT / "examples/model_shapes/llama-2-7b")
QWEN_05B = str(ROOT / "examples/model_shapes/qwen2.5-0.5b")
GiB = 2**30


def sft_config(*overrides):
    from jobs.sft import SFTJobConfig

    return load_config(SFTJobConfig, ["--config", str(ROOT / "jobs/configs/sft_tiny.yaml"), *overrides])


def test_shapes_are_the_published_parameter_counts():
    assert model_shape(LLAMA_7B).parameters == 6_738_415_616  # Llama-2-7B
    assert model_shape(QWEN_05B).parameters == 494_032_768  # Qwen2.5-0.5B, embeddings tied
    assert model_shape(LLAMA_7B).largest_layer == 32000 * 4096


@pytest.mark.parametrize("model, gpus, stage, offload_optimizer, offload_param", [
    (LLAMA_7B, 8, 3, False, False), (LLAMA_7B, 8, 3, True, False), (LLAMA_7B, 1, 3, True, True),
    (LLAMA_7B, 8, 2, False, False), (LLAMA_7B, 8, 2, True, False), (QWEN_05B, 1, 2, False, False),
    (QWEN_05B, 1, 3, False, False),
])
def test_model_states_match_deepspeeds_estimators(model, gpus, stage, offload_optimizer, offload_param):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    # The functions that DeepSpeed's estimate_zero{2,3}_model_states_mem_needs_all_live print; the all_live forms
    # count parameters by data_ptr, which a model on the meta device does not have.
    shape = model_shape(model)
    cfg = sft_config(f"--model.name_or_path={model}", "--scaling.use_gpu=true", f"--scaling.num_workers={gpus}",
                     f"--deepspeed.zero_stage={stage}", f"--deepspeed.offload_optimizer={offload_optimizer}",
                     f"--deepspeed.offload_param={offload_param}", "--train.per_device_batch_size=1")
    planned = plan_of(cfg).model_states_bytes
    if stage == 3:
        _, theirs, _ = estimate_zero3_model_states_mem_needs(
            shape.parameters, shape.largest_layer, num_gpus_per_node=gpus, cpu_offload=offload_optimizer,
            cpu_offload_params=offload_param)
    else:
        _, theirs = estimate_zero2_model_states_mem_needs(shape.parameters, num_gpus_per_node=gpus,
                                                          cpu_offload=offload_optimizer)
    assert abs(planned - theirs) <= 0.10 * theirs, (planned / GiB, theirs / GiB)


def test_zero3_activation_checkpointing_and_lora_each_shrink_what_they_should():
    base = plan_of(sft_config(f"--model.name_or_path={LLAMA_7B}", "--scaling.use_gpu=true",
                              "--scaling.num_workers=8", "--deepspeed.zero_stage=2", "--train.max_length=2048"))
    zero3 = plan_of(sft_config(f"--model.name_or_path={LLAMA_7B}", "--scaling.use_gpu=true",
                               "--scaling.num_workers=8", "--deepspeed.zero_stage=3", "--train.max_length=2048"))
    assert zero3.device["parameters"] == base.device["parameters"] / 8
    checkpointed = plan_of(sft_config(f"--model.name_or_path={LLAMA_7B}", "--scaling.use_gpu=true",
                                      "--scaling.num_workers=8", "--train.gradient_checkpointing=true",
                                      "--train.max_length=2048"))
    # 32 layers' activations against each layer's input and one layer's activations.
    assert checkpointed.device["activations (checkpointed)"] < base.device["activations"] / 8
    lora = plan_of(sft_config(f"--model.name_or_path={LLAMA_7B}", "--scaling.use_gpu=true", "--lora.r=16",
                              "--scaling.num_workers=8", "--train.max_length=2048"))
    assert lora.device["optimizer states"] < base.device["optimizer states"] / 100
    assert lora.device["parameters (frozen)"] > 0.99 * base.device["parameters"]


def test_lora_parameters_are_what_peft_trains(tmp_path):
    from peft import LoraConfig, get_peft_model

    from rayloop.models import create_model_folder, load_model

    folder = str(create_model_folder("tiny", ["12+34=46", "7-5=2"] * 20, tmp_path / "tiny"))
    model, _ = load_model(folder)
    for targets in ("all-linear", ["q_proj", "v_proj"]):
        peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=targets, task_type="CAUSAL_LM"))
        trained = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        assert model_shape(folder).lora_parameters(8, targets) == trained
        model = peft_model.unload()


def test_grpo_counts_the_colocated_engine_and_the_reference_model():
    from jobs.grpo import GRPOJobConfig

    gpu = load_config(GRPOJobConfig, ["--config", str(ROOT / "jobs/configs/grpo_tiny.yaml"),
                                      f"--model.name_or_path={QWEN_05B}", "--scaling.use_gpu=true",
                                      "--scaling.num_workers=1", "--scaling.device_memory_bytes=80GB",
                                      "--rollout.gpu_memory_utilization=0.3", "--beta=0.04"])
    plan = plan_of(gpu)
    assert plan.device["colocated vLLM (rollout.gpu_memory_utilization)"] == int(0.3 * 80e9)
    assert plan.device["reference model"] == plan.device["parameters"]
    no_kl = plan_of(gpu.model_copy(update={"beta": 0.0}))
    assert "reference model" not in no_kl.device


def test_plan_prints_and_starts_nothing(capsys, monkeypatch):
    import ray

    from jobs.sft import SFTJobConfig

    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: pytest.fail("Ray was started"))

    run_cli(SFTJobConfig, lambda cfg: pytest.fail("main ran"), [
        "--config", str(ROOT / "jobs/configs/sft_tiny.yaml"), f"--model.name_or_path={QWEN_05B}",
        "--scaling.use_gpu=true", "--scaling.num_workers=1", "--scaling.device_memory_bytes=24GB",
        "--train.max_length=1024", "--train.per_device_batch_size=2", "--plan"])
    out = capsys.readouterr().out
    assert "memory plan, per GPU" in out and "optimizer states" in out and ": fits" in out


def test_a_config_that_cannot_fit_stops_in_one_line_naming_the_knob(capsys):
    from jobs.sft import SFTJobConfig

    with pytest.raises(SystemExit) as stop:
        run_cli(SFTJobConfig, lambda cfg: pytest.fail("main ran"), [
            "--config", str(ROOT / "jobs/configs/sft_tiny.yaml"), f"--model.name_or_path={LLAMA_7B}",
            "--scaling.use_gpu=true", "--scaling.num_workers=1", "--scaling.device_memory_bytes=24GB",
            "--train.max_length=2048", "--train.per_device_batch_size=1"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "over the 22.35 GiB it has" in err and "--deepspeed.offload_optimizer=true" in err
    fixed = sft_config(f"--model.name_or_path={LLAMA_7B}", "--scaling.use_gpu=true", "--scaling.num_workers=1",
                       "--scaling.device_memory_bytes=24GB", "--train.max_length=2048",
                       "--train.per_device_batch_size=1",
                       *err.split("It fits with ")[1].split(" (")[0].split())
    assert plan_of(fixed).fits


def test_cpu_workers_share_this_machines_memory():
    import psutil

    from jobs.pretrain import PretrainConfig

    cfg = load_config(PretrainConfig, ["--config", str(ROOT / "jobs/configs/pretrain_tiny.yaml"),
                                       "--scaling.num_workers=2"])
    plan = plan_of(cfg)
    assert plan.capacity < psutil.virtual_memory().total / 2
    assert plan.fits and plan.device["worker process"] > plan.device["parameters"]
    on_a_cluster = plan_of(cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"address": "auto"})}))
    assert on_a_cluster.capacity is None and on_a_cluster.fits


def test_estimate_is_per_device_bytes_of_fp32_states_on_cpu():
    from jobs.pretrain import PretrainConfig

    cfg = load_config(PretrainConfig, ["--model.name_or_path=small", "--deepspeed.zero_stage=0"])
    p = model_shape("small").parameters
    plan = estimate(cfg.memory_workload())
    # fp32 weights, their gradients and AdamW's two moments: 16 bytes a parameter without ZeRO.
    assert plan.device["parameters"] + plan.device["gradients (32-bit)"] + plan.device["optimizer states"] == 16 * p
