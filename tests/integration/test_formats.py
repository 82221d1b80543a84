"""Every post-training job on user data in each of TRL's formats that test_posttrain.py does not train on, RLOO,
and LoRA in DPO and in GRPO with vLLM rollouts: real runs asserting a held-out effect of that data.

About 11 minutes on 2 cores, so `make test` leaves it out (it trains one format per job) and `make test-formats`
runs it."""

import json
import os
from pathlib import Path

import pytest

from conftest import posttrain_config
from jobs import dpo, grpo, reward, sft
from test_posttrain import shout_pairs, shout_words, write_jsonl

pytestmark = pytest.mark.skipif(not os.environ.get("RAYLOOP_TEST_FORMATS"),
                                reason="the job x format matrix runs with `make test-formats`")

REWARD_EXAMPLE = "examples.own_reward.my_rewards:contains_target"  # the README's user reward, from the checkout
LORA = "--lora={r: 8, alpha: 32, target_modules: [q_proj, v_proj]}"


def sft_rows(fmt: str, words: list[str]) -> list[dict]:
    if fmt == "text":  # language modeling
        return [{"text": f"shout: {w} -> {w.upper()}"} for w in words]
    if fmt == "prompt-completion":
        return [{"prompt": f"shout: {w} ->", "completion": f" {w.upper()}"} for w in words]
    # conversational prompt-completion
    return [{"prompt": [{"role": "user", "content": f"shout: {w}"}],
             "completion": [{"role": "assistant", "content": w.upper()}]} for w in words]


@pytest.mark.parametrize("fmt", ["text", "prompt-completion", "conversational-prompt-completion"])
def test_sft_on_each_format_lowers_held_out_loss(pretrained_model, posttrain_runs, tmp_path, fmt):
    data = write_jsonl(tmp_path / "train.jsonl", sft_rows(fmt, shout_words(400, seed=11)))
    cfg = posttrain_config(sft.SFTJobConfig, "sft_tiny.yaml", posttrain_runs, f"--model.name_or_path={pretrained_model}",
                           f"--dataset.path={data}", "--dataset.eval_fraction=0.25", f"--storage.name=sft-{fmt}",
                           "--train.steps=30", "--train.checkpoint_every=30")
    loss = sft.main(cfg)["held_out_loss"]
    # ~100 held out: the split keeps the rows of a prompt together, and a few made-up words repeat
    assert loss["n"] >= 95 and loss["ci_high"] < 0 and loss["after"] < 0.8 * loss["before"], loss


def preference_rows(fmt: str, words: list[str]) -> list[dict]:
    if fmt == "explicit":
        return [{"prompt": f"shout: {w} ->", "chosen": f" {w.upper()}", "rejected": f" {w}"} for w in words]
    if fmt == "implicit":
        return shout_pairs(words, conversational=False)
    if fmt == "conversational-explicit":
        return shout_pairs(words, conversational=True)
    # conversational, implicit prompt: whole conversations
    return [{"chosen": [{"role": "user", "content": f"shout: {w}"}, {"role": "assistant", "content": w.upper()}],
             "rejected": [{"role": "user", "content": f"shout: {w}"}, {"role": "assistant", "content": w}]}
            for w in words]


@pytest.mark.parametrize("fmt,lora", [("explicit", False), ("implicit", True), ("conversational-implicit", False)])
def test_dpo_on_each_format_raises_held_out_preference_accuracy(pretrained_model, posttrain_runs, tmp_path, fmt,
                                                                lora):
    train = write_jsonl(tmp_path / "train.jsonl", preference_rows(fmt, shout_words(300, seed=12)))
    held_out = write_jsonl(tmp_path / "eval.jsonl", preference_rows(fmt, shout_words(100, seed=13)))
    cfg = posttrain_config(dpo.DPOJobConfig, "dpo_tiny.yaml", posttrain_runs, f"--model.name_or_path={pretrained_model}",
                           f"--dataset.path={train}", f"--dataset.eval_path={held_out}", f"--storage.name=dpo-{fmt}",
                           "--train.steps=40", "--train.checkpoint_every=40",
                           *([LORA, "--optim.lr=1e-2"] if lora else ["--optim.lr=5e-4"]))
    summary = dpo.main(cfg)
    accuracy = summary["preference"]
    assert accuracy["n"] == 100 and accuracy["ci_low"] > 0, accuracy
    assert ("lora" in summary) == lora and summary["model_dir"].endswith("merged" if lora else "checkpoint"), summary


@pytest.mark.parametrize("fmt", ["explicit", "conversational-explicit", "conversational-implicit"])
def test_reward_model_on_each_format_ranks_held_out_pairs(pretrained_model, posttrain_runs, tmp_path, fmt):
    data = write_jsonl(tmp_path / "pairs.jsonl", preference_rows(fmt, shout_words(400, seed=14)))
    cfg = posttrain_config(reward.RewardJobConfig, "reward_tiny.yaml", posttrain_runs,
                           f"--model.name_or_path={pretrained_model}", f"--dataset.path={data}",
                           "--dataset.eval_fraction=0.25", f"--storage.name=reward-{fmt}", "--train.steps=60",
                           "--train.checkpoint_every=60")
    accuracy = reward.main(cfg)["preference"]
    assert accuracy["n"] >= 95 and accuracy["ci_low"] > 0 and accuracy["after"] > 0.7, accuracy


def prompt_rows(conversational: bool) -> list[dict]:
    example = Path(__file__).parents[2] / "examples" / "own_reward" / "prompts.jsonl"
    rows = [json.loads(line) for line in example.read_text().splitlines()]
    if conversational:
        return [{**r, "prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows]
    return rows


@pytest.mark.parametrize("algorithm,conversational,lora",
                         [("grpo", True, False), ("rloo", False, False), ("grpo", False, True)])
def test_online_rl_on_each_format_raises_the_users_held_out_reward(sft_result, posttrain_runs, tmp_path, algorithm,
                                                                     conversational, lora):
    data = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(conversational))
    name = f"{algorithm}-{'chat' if conversational else 'text'}{'-lora' if lora else ''}"
    cfg = posttrain_config(grpo.GRPOJobConfig, "grpo_tiny.yaml", posttrain_runs,
                           f"--model.name_or_path={sft_result['model_dir']}", f"--algorithm={algorithm}",
                           f"--dataset.path={data}", "--dataset.eval_fraction=0.2", f"--rewards=[{{function: "
                           f"'{REWARD_EXAMPLE}'}}]", f"--storage.name={name}", "--train.steps=10",
                           "--train.checkpoint_every=10", "--train.per_device_batch_size=32",
                           "--rollout.num_generations=4", "--rollout.temperature=1.0", "--eval_samples=8",
                           "--optim.warmup_steps=0", *([LORA, "--optim.lr=1e-2"] if lora else ["--optim.lr=1e-3"]))
    summary = grpo.main(cfg)
    sampled = summary["sampled_reward"]  # the share of sampled held-out completions that contain "7"
    assert sampled["n"] == 48 and sampled["ci_low"] > 0, sampled
    assert ("lora" in summary) == lora and summary["model_dir"].endswith("merged" if lora else "checkpoint"), summary


@pytest.mark.parametrize("family", ["dr_grpo", "dapo", "gspo"])
def test_each_algorithm_family_from_its_config_raises_the_users_held_out_reward(sft_result, posttrain_runs, tmp_path,
                                                                                family):
    """Dr. GRPO, DAPO and GSPO, each from its file of trl.overrides alone (jobs/configs/algorithms/), on the
    README's own reward: TRL's loss takes the family's knobs, and the held-out reward rises."""
    data = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(conversational=False))
    cfg = posttrain_config(grpo.GRPOJobConfig, "grpo_tiny.yaml", posttrain_runs,
                           "--config", f"jobs/configs/algorithms/{family}.yaml",
                           f"--model.name_or_path={sft_result['model_dir']}", f"--dataset.path={data}",
                           "--dataset.eval_fraction=0.2", f"--rewards=[{{function: '{REWARD_EXAMPLE}'}}]",
                           f"--storage.name=family-{family}", "--train.steps=10", "--train.checkpoint_every=10",
                           "--train.per_device_batch_size=32", "--rollout.num_generations=4",
                           "--rollout.temperature=1.0", "--eval_samples=8", "--optim.lr=1e-3",
                           "--optim.warmup_steps=0")
    assert cfg.trl.overrides, "the family's file reached the config"
    summary = grpo.main(cfg)
    sampled = summary["sampled_reward"]  # the share of sampled held-out completions that contain "7"
    assert sampled["n"] == 48 and sampled["ci_low"] > 0, sampled
