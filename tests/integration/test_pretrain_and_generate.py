"""The foundation end to end on a real local Ray cluster: 2 Ray Train workers with DeepSpeed ZeRO-2 pretrain the
tiny preset; transformers loads the result; vLLM generates from it in a Ray task. The run is conftest.py's
`pretrain_result`, which the post-training tests start from."""

import math

import torch

from rayloop.config import GenerateSection
from rayloop.models import load_model
from rayloop.tasks import ArithmeticTask


def test_zero2_on_two_workers_lowers_eval_loss(pretrain_result):
    before, after = pretrain_result["eval_loss_before"], pretrain_result["eval_loss"]
    assert math.isfinite(before) and math.isfinite(after)
    # Untrained, the loss is about ln(vocab) ~ 5.8; 300 steps on the task corpus leave the answers learnt in part and
    # the operands, random digits, as unpredictable as ever.
    assert after < 0.3 * before, f"eval loss {before:.3f} -> {after:.3f}: expected it to fall below 30%"
    assert pretrain_result["step"] == 300 and len(pretrain_result["worker_nodes"]) == 2


def test_the_run_trains_in_the_precision_this_machine_supports(pretrain_result):
    from rayloop.precision import choose

    # auto: bf16 on a CPU with AVX512-BF16/AMX whose bf16 matmuls measure 1.5x fp32's speed (RAYLOOP_CPU_BF16
    # overrides), fp32 elsewhere. The measurements here and in the workers agree far from that bar (0.5x, 3x).
    assert pretrain_result["precision"] == choose("auto", use_gpu=False)[0]


def test_saved_folder_loads_and_generates_in_transformers(pretrain_result):
    model, tokenizer = load_model(pretrain_result["model_dir"])
    ids = tokenizer("12+34=", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids.shape[1]


def test_vllm_generates_what_transformers_generates(ray_cluster, pretrain_result):
    from rayloop.generate import generate_on_ray

    prompts = [e["prompt"] for e in ArithmeticTask().eval_examples()[:16]]
    outputs = generate_on_ray(pretrain_result["model_dir"], prompts, GenerateSection(max_tokens=6, dtype="float32"))
    assert len(outputs) == len(prompts)
    assert all(len(out["token_ids"]) >= 1 for out in outputs), outputs

    model, tokenizer = load_model(pretrain_result["model_dir"], dtype=torch.float32)
    agree = 0
    for prompt, out in zip(prompts, outputs):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        new = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:].tolist()
        if tokenizer.eos_token_id in new:  # transformers pads after EOS; vLLM stops at it
            new = new[: new.index(tokenizer.eos_token_id) + 1]
        agree += new == out["token_ids"]
    # Greedy decoding of the same fp32 weights: vLLM's kernels may break a rare near-tie differently.
    assert agree >= 0.8 * len(prompts), f"vLLM and transformers agreed on {agree}/{len(prompts)} prompts"
