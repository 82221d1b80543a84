"""Bad post-training configs fail in the config loader, naming the field, before Ray is asked for anything."""

import subprocess
import sys
from pathlib import Path

import pytest

from jobs.dpo import DPOJobConfig
from jobs.grpo import GRPOJobConfig
from jobs.reward import RewardJobConfig
from jobs.sft import SFTJobConfig
from conftest import register_checkpoints
from rayloop.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[2]


def grpo(model_dir, *overrides):
    return load_config(GRPOJobConfig, [f"--model.name_or_path={model_dir}", *overrides])


def test_start_model_resolves_run_folder_to_newest_registered_checkpoint(model_dir):
    first = model_dir / "checkpoint_2026-01-01_00-00-00.000000" / "checkpoint"
    # A newer folder that Ray Train never registered, as a crash mid-write leaves it: it must not win.
    crashed = model_dir / "checkpoint_2026-01-03_00-00-00.000000" / "checkpoint"
    crashed.mkdir(parents=True)
    (crashed / "config.json").write_text("{}")
    assert grpo(model_dir).model.name_or_path == str(first)
    newer = model_dir / "checkpoint_2026-01-02_00-00-00.000000" / "checkpoint"
    newer.mkdir(parents=True)
    (newer / "config.json").write_text("{}")
    register_checkpoints(model_dir, first.parent.name, newer.parent.name)
    assert grpo(model_dir).model.name_or_path == str(newer)


@pytest.mark.parametrize("cls", [SFTJobConfig, RewardJobConfig, DPOJobConfig, GRPOJobConfig])
def test_missing_start_model_is_named(cls):
    with pytest.raises(ConfigError, match=r"^model: required, and missing$"):
        load_config(cls, [])


def test_start_model_that_does_not_exist_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"model.name_or_path: no model at .*nope.*config.json"):
        load_config(SFTJobConfig, [f"--model.name_or_path={tmp_path}/nope"])


def test_unknown_algorithm_is_named(model_dir):
    with pytest.raises(ConfigError, match=r"^algorithm: Input should be 'grpo' or 'rloo' \(got 'ppo'\)$"):
        grpo(model_dir, "--algorithm=ppo")


def test_num_generations_must_divide_the_batch(model_dir):
    with pytest.raises(ConfigError, match=r"rollout.num_generations \(6\) must divide .* \(64\)"):
        grpo(model_dir, "--rollout.num_generations=6", "--train.per_device_batch_size=32")
    assert grpo(model_dir, "--rollout.num_generations=8", "--train.per_device_batch_size=32")


def test_rewards_cannot_be_empty_or_unknown_or_miss_their_model(model_dir):
    with pytest.raises(ConfigError, match=r"rewards: at least one reward is required"):
        grpo(model_dir, "--rewards=[]")
    with pytest.raises(ConfigError, match=r"rewards.0.name: Input should be 'exact_match', 'format' or 'reward_model'"):
        grpo(model_dir, "--rewards=[{name: bleu}]")
    with pytest.raises(ConfigError, match=r"rewards.0: reward_model needs path"):
        grpo(model_dir, "--rewards=[{name: reward_model}]")
    with pytest.raises(ConfigError, match=r"rewards.0: no model at '/nope'"):
        grpo(model_dir, "--rewards=[{name: reward_model, path: /nope}]")


def test_combined_rewards_keep_order_and_weights(model_dir):
    from rayloop.rewards import exact_match, integer_format, reward_funcs

    cfg = grpo(model_dir, f"--rewards=[{{name: exact_match}}, {{name: format, weight: 0.2}}, "
                          f"{{name: reward_model, path: {model_dir}, weight: 0.5}}]")
    funcs, weights = reward_funcs(cfg.rewards)
    assert funcs[:2] == [exact_match, integer_format] and funcs[2].endswith("/checkpoint")
    assert weights == [1.0, 0.2, 0.5]


def test_server_mode_needs_a_url(model_dir):
    with pytest.raises(ConfigError, match=r"rollout.server_base_url is required"):
        grpo(model_dir, "--rollout.vllm_mode=server")


def test_grpo_job_rejects_bad_config_before_ray(model_dir):
    # RAY_ADDRESS points nowhere: if the job reached Ray it would fail differently (and slowly).
    result = subprocess.run([sys.executable, "-m", "jobs.grpo", f"--model.name_or_path={model_dir}",
                             "--rollout.num_generations=3"], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={"RAY_ADDRESS": "127.0.0.1:1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("config error: rollout.num_generations (3) must divide")


def test_schedule_reaches_the_trl_arguments(model_dir, tmp_path):
    from rayloop.posttrain import training_arguments

    constant = grpo(model_dir, "--optim.schedule=constant")
    assert training_arguments(constant, str(tmp_path), bf16=False)["lr_scheduler_type"] == "constant_with_warmup"
    assert training_arguments(grpo(model_dir), str(tmp_path), bf16=False)["lr_scheduler_type"] == "cosine"
    with pytest.raises(ConfigError, match="optim.schedule"):
        grpo(model_dir, "--optim.schedule=linear")


def test_colocated_vllm_gets_its_kv_cache_in_bytes(model_dir):
    import trl.generation.vllm_generation as vllm_generation

    from rayloop.posttrain import colocated_vllm_options, online_generation_arguments

    cfg = grpo(model_dir, "--rollout.kv_cache_memory_bytes=96MiB")
    with colocated_vllm_options(cfg.rollout, bf16=False):
        assert vllm_generation.LLM.keywords["kv_cache_memory_bytes"] == 96 << 20
        assert vllm_generation.LLM.keywords["dtype"] == "float32"
    assert not hasattr(vllm_generation.LLM, "keywords")  # restored
