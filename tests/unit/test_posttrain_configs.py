"""Bad post-training configs fail in the config loader, naming the field, before Ray is asked for anything."""

import json
import re
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
    with pytest.raises(ConfigError, match=r"rewards.0: give exactly one of function, url or model \(got none\)"):
        grpo(model_dir, "--rewards=[{weight: 2}]")
    with pytest.raises(ConfigError, match=r"rewards.0: give exactly one of .* \(got \['function', 'model'\]\)"):
        grpo(model_dir, f"--rewards=[{{function: 'rayloop.rewards:exact_match', model: {model_dir}}}]")
    with pytest.raises(ConfigError, match=r"rewards.0: no model at '/nope'"):
        grpo(model_dir, "--rewards=[{model: /nope}]")


def test_combined_rewards_keep_order_and_weights(model_dir):
    from rayloop.rewards import reward_funcs

    cfg = grpo(model_dir, f"--rewards=[{{function: 'rayloop.rewards:exact_match'}}, "
                          f"{{function: 'rayloop.rewards:integer_format', weight: 0.2}}, "
                          f"{{model: {model_dir}, weight: 0.5}}]")
    funcs, weights = reward_funcs(cfg.rewards)
    assert [f.__name__ for f in funcs[:2]] == ["exact_match", "integer_format"] and funcs[2].endswith("/checkpoint")
    assert funcs[0](prompts=["1+1="], completions=["2"], answer=["2"]) == [1.0]
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
    assert training_arguments(constant, str(tmp_path), precision="fp32")["lr_scheduler_type"] == "constant_with_warmup"
    assert training_arguments(grpo(model_dir), str(tmp_path), precision="fp32")["lr_scheduler_type"] == "cosine"
    with pytest.raises(ConfigError, match="optim.schedule"):
        grpo(model_dir, "--optim.schedule=linear")


def test_bf16_is_autocast_on_a_cpu_and_bf16_weights_on_a_gpu(model_dir, tmp_path):
    from rayloop.posttrain import training_arguments

    cpu = training_arguments(grpo(model_dir), str(tmp_path), precision="bf16")
    # bf16 weights (the Trainer's bf16=True) did not train the tiny models on a CPU; autocast inside DeepSpeed did.
    assert cpu["bf16"] is False and cpu["use_cpu"] is True
    assert cpu["deepspeed"]["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    gpu = training_arguments(grpo(model_dir, "--scaling.use_gpu=true"), str(tmp_path), precision="bf16")
    assert gpu["bf16"] is True and "torch_autocast" not in gpu["deepspeed"]
    fp32 = training_arguments(grpo(model_dir), str(tmp_path), precision="fp32")
    assert fp32["bf16"] is False and "torch_autocast" not in fp32["deepspeed"]


def test_colocated_vllm_gets_its_kv_cache_in_bytes(model_dir):
    import trl.generation.vllm_generation as vllm_generation

    from rayloop.posttrain import colocated_vllm_options, online_generation_arguments

    cfg = grpo(model_dir, "--rollout.kv_cache_memory_bytes=96MiB")
    with colocated_vllm_options(cfg.rollout, bf16=False):
        assert vllm_generation.LLM.keywords["kv_cache_memory_bytes"] == 96 << 20
        assert vllm_generation.LLM.keywords["dtype"] == "float32"
    assert not hasattr(vllm_generation.LLM, "keywords")  # restored


# ---------------------------------------------------------------------------------------------------------------
# The user's data and rewards: every mistake below is one line naming the field, raised by the config loader
# (before Ray); test_user_input_errors_exit_2_before_ray runs one of them as a job.
# ---------------------------------------------------------------------------------------------------------------

USER_REWARDS = '''
def contains_seven(completions, **kwargs):
    return [float("7" in c) for c in completions]

def no_kwargs(prompts, completions):
    return [0.0] * len(completions)

def needs_difficulty(completions, difficulty, **kwargs):
    return [0.0] * len(completions)

not_callable = 3
'''


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def user_files(tmp_path, monkeypatch):
    """A user's project: data files of each kind and a reward module on sys.path (a job's working directory)."""
    from datasets import Dataset, DatasetDict

    (tmp_path / "my_rewards_module.py").write_text(USER_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(20)]
    files = {
        "prompts": _jsonl(tmp_path / "prompts.jsonl", prompts),
        "completions": _jsonl(tmp_path / "pc.jsonl", [{"prompt": p["prompt"], "completion": p["answer"]}
                                                      for p in prompts]),
        "prompt_only_for_sft": _jsonl(tmp_path / "po.jsonl", [{"prompt": p["prompt"]} for p in prompts]),
        "chosen_only": _jsonl(tmp_path / "chosen.jsonl", [{"chosen": "a"}] * 10),
        "implicit": _jsonl(tmp_path / "implicit.jsonl", [{"chosen": "1+1=2", "rejected": "1+1=3"}] * 10),
        "empty": tmp_path / "empty.jsonl",
        "text": tmp_path / "notes.txt",
        "broken": tmp_path / "broken.jsonl",
        "numbers": _jsonl(tmp_path / "numbers.jsonl", [{"prompt": i, "completion": "x"} for i in range(10)]),
        "nulls": _jsonl(tmp_path / "nulls.jsonl", [{"prompt": f"p{i}", "completion": None} for i in range(10)]),
        "one": _jsonl(tmp_path / "one.jsonl", prompts[:1]),
        "dict": tmp_path / "dict",
    }
    files["empty"].write_text("")
    files["text"].write_text("some notes\n")
    files["broken"].write_text('{"prompt": "1+1=", "answer": \n')
    DatasetDict({"validation": Dataset.from_list(prompts)}).save_to_disk(str(files["dict"]))
    return files


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when the block ends: nothing listens there


BAD_USER_INPUT = [
    # (name, job, overrides with <file> placeholders, the one-line error)
    ("missing column", SFTJobConfig, ["--dataset.path=<prompt_only_for_sft>"],
     r"dataset: missing column 'completion': the sft job reads prompt-completion \('prompt', 'completion'\) or "
     r"language modeling \('text'\) or conversational language modeling \('messages'\); the dataset has \['prompt'\]"),
    ("wrong format for the job", DPOJobConfig, ["--dataset.path=<completions>"],
     r"dataset: missing column 'chosen': the dpo job reads preference \('chosen', 'rejected'\)"),
    ("half a preference pair", RewardJobConfig, ["--dataset.path=<chosen_only>"],
     r"dataset: missing column 'rejected'"),
    ("preference data for GRPO", GRPOJobConfig, ["--dataset.path=<implicit>"],
     r"dataset: missing column 'prompt': the grpo job reads prompt-only \('prompt'\)"),
    ("empty dataset", SFTJobConfig, ["--dataset.path=<empty>"], r"dataset: .*empty"),
    ("no such file", SFTJobConfig, ["--dataset.path=<empty>.missing"], r"dataset: .*empty.jsonl.missing: no such file"),
    ("not a data file", SFTJobConfig, ["--dataset.path=<text>"],
     r"dataset: .*notes.txt: expected .jsonl, .json, .parquet or .csv files"),
    ("malformed JSON lines", SFTJobConfig, ["--dataset.path=<broken>"], r"dataset: .*broken.jsonl: cannot be read"),
    ("numbers where text belongs", SFTJobConfig, ["--dataset.path=<numbers>"],
     r"dataset: column 'prompt', row 0: expected text or a list of \{role, content\} messages, got 0"),
    ("null completion", SFTJobConfig, ["--dataset.path=<nulls>"], r"dataset: column 'completion', row 0: .* got None"),
    ("too few rows to hold out", GRPOJobConfig, ["--dataset.path=<one>"], r"dataset: .*1 distinct prompt\(s\): too few"),
    ("stop on exact match without answers", SFTJobConfig,
     ["--dataset.path=<completions>", "--train.stop_at_exact_match=0.7"],
     r"train.stop_at_exact_match: needs the task's data \(no dataset.path\) and train.eval_samples >= the 2 workers"),
    ("stop on exact match, never measured", SFTJobConfig, ["--train.stop_at_exact_match=0.7", "--train.eval_samples=0"],
     r"train.stop_at_exact_match: needs the task's data"),
    ("stop on exact match for a scoring model", RewardJobConfig,
     ["--train.stop_at_exact_match=0.7", "--train.eval_samples=64"],
     r"train.stop_at_exact_match: a reward model scores answers, it does not write them"),
    ("eval file without data", SFTJobConfig, ["--dataset.eval_path=<completions>"],
     r"dataset.eval_path needs dataset.path"),
    ("split not in the folder", GRPOJobConfig, ["--dataset.path=<dict>"],
     r"dataset: .*dict: no split 'train' \(it has \['validation'\]\); set dataset.split"),
    ("unimportable reward", GRPOJobConfig, ["--rewards=[{function: 'no_such_module:f'}]"],
     r"rewards.0: function 'no_such_module:f': cannot import 'no_such_module': ModuleNotFoundError"),
    ("reward not in the module", GRPOJobConfig, ["--rewards=[{function: 'my_rewards_module:missing'}]"],
     r"rewards.0: function 'my_rewards_module:missing': 'my_rewards_module' has no function 'missing'"),
    ("reward not callable", GRPOJobConfig, ["--rewards=[{function: 'my_rewards_module:not_callable'}]"],
     r"rewards.0: .* has no function 'not_callable'"),
    ("reward path without a colon", GRPOJobConfig, ["--rewards=[{function: my_rewards_module.contains_seven}]"],
     r"rewards.0: function 'my_rewards_module.contains_seven': expected 'package.module:function'"),
    ("reward signature without **kwargs", GRPOJobConfig, ["--rewards=[{function: 'my_rewards_module:no_kwargs'}]"],
     r"rewards.0: function 'my_rewards_module:no_kwargs' cannot take TRL's reward arguments \(got an unexpected "
     r"keyword argument '.*'\): .*add \*\*kwargs"),
    ("reward needs a column the data lacks", GRPOJobConfig,
     ["--dataset.path=<prompts>", "--rewards=[{function: 'my_rewards_module:needs_difficulty'}]"],
     r"rewards.0: .*missing a required argument: 'difficulty'"),
    ("built-in reward on data without answers", GRPOJobConfig,
     ["--dataset.path=<prompt_only_for_sft>", "--rewards=[{function: 'rayloop.rewards:exact_match'}]"],
     r"rewards.0: function 'rayloop.rewards:exact_match' cannot take .*missing a required argument: 'answer'"),
    ("unreachable HTTP reward", GRPOJobConfig, ["--rewards=[{url: 'http://127.0.0.1:<port>/score'}]"],
     r"rewards.0: url 'http://127.0.0.1:\d+/score': cannot reach 127.0.0.1:\d+: .*refused"),
    ("reward URL that is not HTTP", GRPOJobConfig, ["--rewards=[{url: 'ftp://example.org/score'}]"],
     r"rewards.0: url 'ftp://example.org/score': expected http://host\[:port\]/path"),
]


@pytest.mark.parametrize("name, cls, overrides, error", BAD_USER_INPUT, ids=[case[0] for case in BAD_USER_INPUT])
def test_bad_user_input_is_one_line_naming_the_field(user_files, model_dir, name, cls, overrides, error):
    values = {key: str(path) for key, path in user_files.items()} | {"port": str(_closed_port())}
    argv = [f"--model.name_or_path={model_dir}",
            *(re.sub(r"<(\w+)>", lambda m: values[m.group(1)], o) for o in overrides)]
    with pytest.raises(ConfigError) as raised:
        load_config(cls, argv)
    message = str(raised.value)
    assert "\n" not in message and re.search(error, message), message


def test_user_data_and_reward_that_fit_are_accepted(user_files, model_dir):
    cfg = load_config(GRPOJobConfig, [f"--model.name_or_path={model_dir}", f"--dataset.path={user_files['prompts']}",
                                      "--rewards=[{function: 'my_rewards_module:contains_seven', weight: 2}, "
                                      "{function: 'rayloop.rewards:exact_match'}]"])
    train, held_out = cfg.data()
    assert len(train) == 18 and len(held_out) == 2 and set(train.column_names) == {"prompt", "answer"}
    assert [r.name for r in cfg.rewards] == ["contains_seven", "exact_match"]


def test_user_input_errors_exit_2_before_ray(user_files, model_dir):
    result = subprocess.run([sys.executable, "-m", "jobs.dpo", f"--model.name_or_path={model_dir}",
                             f"--dataset.path={user_files['completions']}"], cwd=REPO, capture_output=True,
                            text=True, timeout=120, env={"RAY_ADDRESS": "127.0.0.1:1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("config error: dataset: missing column 'chosen'")


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    from rayloop.models import create_model_folder
    from rayloop.tasks import ArithmeticTask

    return create_model_folder("tiny", ArithmeticTask().pretrain_corpus()[:200], tmp_path_factory.mktemp("llama"))


def test_lora_targets_must_be_linear_layers_of_the_model(llama_folder):
    with pytest.raises(ConfigError, match=r"^lora.target_modules: \['c_attn'\] match no linear layer of .* \(it has "
                                          r"\['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', "
                                          r"'up_proj', 'v_proj'\]\)$"):
        load_config(SFTJobConfig, [f"--model.name_or_path={llama_folder}", "--lora.target_modules=[q_proj, c_attn]"])
    cfg = load_config(SFTJobConfig, [f"--model.name_or_path={llama_folder}", "--lora={r: 4}"])
    assert cfg.peft_config().r == 4 and cfg.peft_config().target_modules == "all-linear"
    assert load_config(SFTJobConfig, [f"--model.name_or_path={llama_folder}"]).peft_config() is None
    with pytest.raises(ConfigError, match=r"lora: the reward job trains its scoring head and body in full"):
        load_config(RewardJobConfig, [f"--model.name_or_path={llama_folder}", "--lora={}"])


# A resumed run and train.stop_at_exact_match (rayloop.posttrain.stopped_at_target)


def _checkpoint(tmp_path, history: list[dict]):
    from ray.train import Checkpoint

    folder = tmp_path / "checkpoint_000"
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "checkpoint" / "trainer_state.json").write_text(json.dumps({"global_step": 50, "log_history": history}))
    return Checkpoint.from_directory(str(folder))


@pytest.mark.parametrize("history,target,stopped", [
    ([{"eval_exact_match": 0.2, "step": 50}, {"eval_exact_match": 0.72, "step": 100}], 0.7, True),
    # the last measurement decides, not the best one
    ([{"eval_exact_match": 0.75, "step": 50}, {"eval_exact_match": 0.6, "step": 100}], 0.7, False),
    ([{"eval_exact_match": 0.72, "step": 100}, {"loss": 0.1, "step": 100}], 0.7, True),
    ([{"loss": 0.1, "step": 100}], 0.7, False),
    ([{"eval_exact_match": 0.9, "step": 100}], None, False),
])
def test_a_resumed_run_that_reached_its_exact_match_target_stays_stopped(tmp_path, history, target, stopped):
    cfg = load_config(SFTJobConfig, ["--config", "jobs/configs/sft_tiny.yaml",
                                     f"--train.stop_at_exact_match={'null' if target is None else target}"],
                      context={"model_from_previous_stage": True})
    from rayloop.posttrain import stopped_at_target

    assert stopped_at_target(cfg, _checkpoint(tmp_path, history)) is stopped
