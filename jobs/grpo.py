"""Online RL with verifiable rewards: TRL's GRPOTrainer (or RLOOTrainer) inside Ray Train, vLLM rollouts.

    python -m jobs.grpo --config jobs/configs/grpo_tiny.yaml
    python -m jobs.grpo --config jobs/configs/grpo_tiny.yaml --algorithm=rloo
    ray job submit --working-dir . -- python -m jobs.grpo --config jobs/configs/grpo_tiny.yaml

Prompts: `dataset.path` in TRL's prompt-only format (`prompt`, a string or messages; every other column reaches
the reward functions), else the arithmetic task's. Each worker samples `rollout.num_generations` completions per
prompt, scores them with the configured rewards (functions by import path, HTTP endpoints, a learned reward model:
rayloop.rewards; weighted and summed by TRL) and takes a policy step. Rollouts come from a vLLM engine colocated in
each worker; on CPU its weights are synced through vLLM's `reload_weights` (rayloop.posttrain), on GPU through
TRL's own path. Prints, against the starting model and paired on the same held-out prompts with a 95% confidence
interval: the mean reward of greedy completions and of `eval_samples` sampled ones, and on the task's data
greedy exact-match accuracy.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from rayloop.config import run_cli
from rayloop.console import say
from rayloop.posttrain import PostTrainConfig, RolloutSection
from rayloop.rewards import RewardSpec

EXACT_MATCH = RewardSpec(function="rayloop.rewards:exact_match")


class GRPOJobConfig(PostTrainConfig):
    """Online RL (TRL GRPO or RLOO) with vLLM rollouts on Ray Train."""

    job_name = "grpo"
    data_format = "grpo"
    trl_reserved = {
        "num_generations": "rollout.num_generations", "max_completion_length": "rollout.max_completion_length",
        "temperature": "rollout.temperature", "use_vllm": "rollout.engine", "vllm_mode": "rollout.vllm_mode",
        "vllm_max_model_length": "rollout.max_model_len",
        "vllm_gpu_memory_utilization": "rollout.gpu_memory_utilization",
        "vllm_server_base_url": "rollout.server_base_url", "beta": "beta", "reward_weights": "rewards",
        "log_completions": "nothing: completions stay out of the logs",
        # No eval_dataset reaches the trainer: the job evaluates the held-out prompts itself, after training.
        "eval_strategy": "eval_samples", "eval_steps": "eval_samples", "do_eval": "eval_samples"}
    algorithm: Literal["grpo", "rloo"] = "grpo"
    """`grpo`: group-normalised advantages (TRL GRPOTrainer); `rloo`: leave-one-out baseline (TRL RLOOTrainer).
    TRL 1.16 ships no PPO trainer."""
    rollout: RolloutSection = RolloutSection()
    rewards: list[RewardSpec] = Field(
        default_factory=lambda: [RewardSpec(function="rayloop.rewards:exact_match")])
    """Rewards, weighted and summed; at least one (rayloop.rewards)."""
    beta: float = Field(default=0.04, ge=0)
    """KL penalty towards the starting model (0: no reference model, no KL)."""
    eval_samples: int = Field(default=16, ge=1)
    """Completions sampled per held-out prompt at `rollout.temperature` for the held-out mean reward of sampled
    completions (the quantity GRPO optimises), reported beside that of greedy ones."""

    def memory_workload(self):
        r = self.rollout
        colocated = r.engine == "vllm" and r.vllm_mode == "colocate"
        vllm = {}
        if colocated:
            vllm = ({"vllm_share": r.gpu_memory_utilization} if self.scaling.use_gpu
                    else {"vllm_kv_cache_bytes": int(r.kv_cache_memory_bytes)})
        # Completions of up to max_model_len tokens (prompt and completion), per_device_batch_size of them.
        return super().memory_workload(tokens=self.train.per_device_batch_size * r.max_model_len,
                                       reference_model=self.beta > 0 and self.lora is None, **vllm)

    def trl_config_class(self):
        from trl import GRPOConfig, RLOOConfig

        return GRPOConfig if self.algorithm == "grpo" else RLOOConfig

    def trl_known_args(self):
        return super().trl_known_args() | {"num_generations": self.rollout.num_generations}

    def task_data(self):
        from rayloop.tasks import ArithmeticTask

        task = ArithmeticTask(self.task)
        return task.train_examples(), task.eval_examples()

    @model_validator(mode="after")
    def _rewards_fit_the_data(self):
        from rayloop.rewards import check_signature

        if not self.rewards:
            raise ValueError("rewards: at least one reward is required (a function, url or model)")
        if self.dataset.path is None:
            columns = ["prompt", "answer"]
        else:  # the rewards score the held-out rows too: only the columns both sides have reach them there
            from rayloop.dataset import read

            columns = read(self.dataset.path, self.dataset.split).column_names
            if self.dataset.eval_path is not None:
                held_out = set(read(self.dataset.eval_path, self.dataset.eval_split).column_names)
                columns = [c for c in columns if c in held_out]
        for i, spec in enumerate(self.rewards):
            try:
                check_signature(spec, columns)
            except ValueError as exc:
                raise ValueError(f"rewards.{i}: {exc}") from None
        return self

    @model_validator(mode="after")
    def _rollouts_fit_the_batch(self):
        if self.global_batch_size % self.rollout.num_generations:
            raise ValueError(
                f"rollout.num_generations ({self.rollout.num_generations}) must divide the global batch of "
                f"completions, train.per_device_batch_size x scaling.num_workers x train.grad_accum "
                f"({self.global_batch_size})")
        return self


def build_trainer(cfg: GRPOJobConfig, model_dir: str, args: dict):
    from trl import GRPOTrainer, RLOOTrainer

    from rayloop.posttrain import colocated_vllm_options, online_generation_arguments, use_cpu_weight_sync
    from rayloop.rewards import reward_funcs
    from rayloop.trl_config import build

    trainer_cls = GRPOTrainer if cfg.algorithm == "grpo" else RLOOTrainer
    funcs, weights = reward_funcs(cfg.rewards)
    online = online_generation_arguments(cfg.rollout)
    dataset, _ = cfg.data()
    with colocated_vllm_options(cfg.rollout, bf16=args["bf16"]):
        trainer = trainer_cls(
            model=model_dir,
            reward_funcs=funcs,
            args=build(cfg.trl_config_class(), {**args, **online, "beta": cfg.beta, "reward_weights": weights,
                                                "log_completions": False}, cfg.trl.overrides),
            train_dataset=dataset,
            peft_config=cfg.peft_config(),
        )
    use_cpu_weight_sync(trainer)
    return trainer


def main(cfg: GRPOJobConfig) -> dict:
    from jobs import grpo
    from rayloop import storage
    from rayloop.config import GenerateSection
    from rayloop.evaluate import compare_exact_match, compare_rewards, describe
    from rayloop.posttrain import fit
    from rayloop.registry import register

    summary = fit(cfg, grpo.build_trainer, plot_keys=["reward", "eval_exact_match"], plot_name="reward")
    _, held_out = cfg.data()
    rows, use_gpu = held_out.to_list(), cfg.scaling.use_gpu
    # The rollouts' own sampling, in their precision: fp32 on a CPU (vLLM-CPU would otherwise load fp32 as bf16).
    sampled = GenerateSection(max_tokens=cfg.rollout.max_completion_length, temperature=cfg.rollout.temperature,
                              samples_per_prompt=cfg.eval_samples, dtype="auto" if use_gpu else "float32",
                              max_model_len=cfg.rollout.max_model_len,
                              kv_cache_memory_bytes=cfg.rollout.kv_cache_memory_bytes)
    greedy = sampled.model_copy(update={"temperature": 0.0, "samples_per_prompt": 1})
    start, trained = cfg.model.name_or_path, summary["model_dir"]
    say(f"{cfg.algorithm}: held-out evaluation of the start and trained models ({len(rows)} prompts, vLLM)")
    try:
        summary["greedy_reward"], summary["sampled_reward"] = compare_rewards(cfg.rewards, start, trained, rows,
                                                                              [greedy, sampled], use_gpu=use_gpu)
    except Exception as exc:  # noqa: BLE001 - a user's reward failing on the held-out rows: one line
        from rayloop.config import JobError
        from rayloop.rewards import run_error

        if (reason := run_error(exc)) is None:
            raise
        raise JobError(f"held-out evaluation: {reason}") from None
    line = (f"{cfg.algorithm}: step {summary.get('step')}, held-out reward, greedy "
            f"{_describe_reward(summary['greedy_reward'])}; sampled at temperature {cfg.rollout.temperature} "
            f"{_describe_reward(summary['sampled_reward'])}")
    if cfg.dataset.path is None and [r.model_dump() for r in cfg.rewards] == [EXACT_MATCH.model_dump()]:
        # The greedy reward is this figure already: the same greedy answers, scored the same way.
        summary["exact_match"] = summary["greedy_reward"]
        line += "; that is the held-out exact match"
    elif cfg.dataset.path is None:  # the task's data carries answers
        summary["exact_match"] = compare_exact_match(start, trained, rows, use_gpu=use_gpu)
        line += f"; {describe('exact match (greedy)', summary['exact_match'])}"
    say(f"{line}; model at {trained}")
    summary["model_version"] = register(cfg, summary, job=cfg.algorithm, parent=start)
    storage.write_json(cfg.storage.run_path("results.json"), summary)
    return summary


def _describe_reward(result: dict) -> str:
    return (f"{result['before']:.3f} -> {result['after']:.3f} (difference {result['difference']:+.3f}, 95% CI "
            f"[{result['ci_low']:+.3f}, {result['ci_high']:+.3f}], n={result['n']})")


if __name__ == "__main__":
    from jobs import grpo

    run_cli(grpo.GRPOJobConfig, grpo.main)
