"""The foundation end to end on a real local Ray cluster: 2 Ray Train workers with DeepSpeed ZeRO-2 pretrain the
tiny preset; transformers loads the result; vLLM generates from it in a Ray task."""

import math

import pytest
import torch

from jobs import pretrain
from rayloop.config import GenerateSection, load_config
from rayloop.models import load_model
from rayloop.tasks import ArithmeticTask


@pytest.fixture(scope="module")
def pretrained(ray_cluster, tmp_path_factory):
    cfg = load_config(pretrain.PretrainConfig, [
        f"--storage.path={tmp_path_factory.mktemp('runs')}", "--scaling.num_workers=2", "--deepspeed.zero_stage=2",
        "--train.steps=30", "--train.log_every=10", "--task.num_train=2000", "--task.num_eval=100",
    ])
    return pretrain.main(cfg)


def test_zero2_on_two_workers_lowers_eval_loss(pretrained):
    before, after = pretrained["eval_loss_before"], pretrained["eval_loss"]
    assert math.isfinite(before) and math.isfinite(after)
    # Untrained, the loss is about ln(vocab) ~ 6; 30 steps of the tiny model on the task corpus reach ~2.5.
    assert after < 0.6 * before, f"eval loss {before:.3f} -> {after:.3f}: expected it to fall below 60%"
    assert pretrained["step"] == 30


def test_the_run_trains_in_the_precision_this_machine_supports(pretrained):
    from rayloop.precision import choose

    # auto: bf16 on a CPU with AVX512-BF16/AMX whose bf16 matmuls measure 1.5x fp32's speed (RAYLOOP_CPU_BF16
    # overrides), fp32 elsewhere. The measurements here and in the workers agree far from that bar (0.5x, 3x).
    assert pretrained["precision"] == choose("auto", use_gpu=False)[0]


def test_saved_folder_loads_and_generates_in_transformers(pretrained):
    model, tokenizer = load_model(pretrained["model_dir"])
    ids = tokenizer("12+34=", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids.shape[1]


def test_vllm_generates_what_transformers_generates(ray_cluster, pretrained):
    from rayloop.generate import generate_on_ray

    prompts = [e["prompt"] for e in ArithmeticTask().eval_examples()[:16]]
    outputs = generate_on_ray(pretrained["model_dir"], prompts, GenerateSection(max_tokens=6, dtype="float32"))
    assert len(outputs) == len(prompts)
    assert all(len(out["token_ids"]) >= 1 for out in outputs), outputs

    model, tokenizer = load_model(pretrained["model_dir"], dtype=torch.float32)
    agree = 0
    for prompt, out in zip(prompts, outputs):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        new = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        if tokenizer.eos_token_id in new:  # transformers pads after EOS; vLLM stops at it
            new = new[: new.index(tokenizer.eos_token_id) + 1]
        agree += new == out["token_ids"]
    # Greedy decoding of the same fp32 weights: vLLM's kernels may break a rare near-tie differently.
    assert agree >= 0.8 * len(prompts), f"vLLM and transformers agreed on {agree}/{len(prompts)} prompts"
