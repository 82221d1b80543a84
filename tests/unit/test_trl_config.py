"""trl.overrides: TRL's own fields from YAML, checked against the real TRL config classes before Ray starts."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
from trl import DPOConfig, GRPOConfig, RewardConfig, RLOOConfig, SFTConfig

from jobs.dpo import DPOJobConfig
from jobs.grpo import GRPOJobConfig
from jobs.reward import RewardJobConfig
from jobs.sft import SFTJobConfig
from rayloop.config import ConfigError, load_config
from rayloop.trl_config import CHOICES, TRAINING_ARGUMENTS, build, check

REPO = Path(__file__).resolve().parents[2]
ALGORITHMS = sorted((REPO / "jobs" / "configs" / "algorithms").glob("*.yaml"))


def grpo(model_dir, *argv):
    return load_config(GRPOJobConfig, [f"--model.name_or_path={model_dir}", *argv])


@pytest.mark.parametrize("path", ALGORITHMS, ids=lambda p: p.stem)
def test_each_algorithm_config_opens_with_its_command_and_reaches_trl(path, model_dir):
    """Each family's file, laid over grpo_tiny.yaml as its first line says, gives the TRL config its knobs."""
    command = path.read_text().splitlines()[0]
    configs = re.findall(r"--config (\S+)", command)
    assert command.startswith("# python -m jobs.grpo ") and configs[-1] == f"jobs/configs/algorithms/{path.name}"
    cfg = grpo(model_dir, *[a for c in configs for a in ("--config", str(REPO / c))])
    overlay = __import__("yaml").safe_load(path.read_text())
    assert set(overlay) <= {"trl", "algorithm"}, "a family is TRL's knobs (and the trainer), nothing else"
    args = build(cfg.trl_config_class(), {"output_dir": "/tmp", "use_cpu": True, "report_to": []},
                 cfg.trl.overrides)
    for key, value in overlay.get("trl", {}).get("overrides", {}).items():
        assert getattr(args, key) == value
    assert type(args) is (RLOOConfig if overlay.get("algorithm") == "rloo" else GRPOConfig)


def test_families_differ_from_trl_default(model_dir):
    """Without overrides TRL's GRPOConfig takes DAPO's loss; each family changes what it says it changes."""
    default = build(GRPOConfig, {"output_dir": "/tmp", "use_cpu": True, "report_to": []}, {})
    assert (default.loss_type, default.importance_sampling_level) == ("dapo", "token")
    gspo = grpo(model_dir, "--config", str(REPO / "jobs/configs/algorithms/gspo.yaml")).trl.overrides
    assert gspo["importance_sampling_level"] == "sequence" and gspo["loss_type"] == "grpo"


@pytest.mark.parametrize("argv, message", [
    (["--trl.overrides.loss_typ=dr_grpo"],
     r"^trl\.overrides\.loss_typ: GRPOConfig \(TRL [\d.]+\) has no field 'loss_typ' \(did you mean loss_type"),
    (["--trl.overrides.loss_type=ppo"], r"^trl\.overrides\.loss_type: 'ppo' is not one of 'grpo', 'dr_grpo'"),
    (["--trl.overrides.importance_sampling_level=seq"], r"^trl\.overrides\.importance_sampling_level: 'seq' is not"),
    (["--trl.overrides.epsilon_high=wide"], r"^trl\.overrides\.epsilon_high: 'wide' is not a valid float \| None"),
    (["--trl.overrides.num_iterations=1.5"], r"^trl\.overrides\.num_iterations: 1\.5 is not a valid int"),
    (["--trl.overrides.learning_rate=1e-5"], r"^trl\.overrides\.learning_rate: rayloop sets GRPOConfig\.learning_rate "
                                             r"itself; use optim\.lr$"),
    (["--trl.overrides.num_generations=4"], r"use rollout\.num_generations$"),
    (["--trl.overrides.fp16=true"], r"use deepspeed\.precision$"),
    (["--trl.overrides.optim=adafactor"], r"use deepspeed\.overrides \(its `optimizer` section\)$"),
    (["--trl.overrides.eval_strategy=steps"], r"use eval_samples$"),
    (["--trl.overrides.vllm_importance_sampling_mode=bogus"], r"'bogus' is not one of 'token_truncate'"),
    (["--trl.overrides.loss_type=1"], r"^trl\.overrides\.loss_type: 1 is not one of"),
    (["--train.per_device_batch_size=256", "--trl.overrides.generation_batch_size=256"],
     r"refuses generation_batch_size=256: generation_batch_size \(256\) must be divisible by the global batch size "
     r"\(512\)"),
    (["--trl.overrides.top_p=0"], r"^trl\.overrides\.top_p: 0\.0 must be in \(0, 1\]$"),
    (["--trl.overrides.generation_batch_size=64", "--trl.overrides.steps_per_generation=2"],
     r"^trl\.overrides: GRPOConfig refuses generation_batch_size=64, steps_per_generation=2: 'generation_batch_size' "
     r"and 'steps_per_generation' can not be both configured"),
    (["--algorithm=rloo", "--trl.overrides.loss_type=dr_grpo"], r"RLOOConfig \(TRL [\d.]+\) has no field 'loss_type'"),
])
def test_bad_override_fails_in_one_line_naming_the_key(model_dir, argv, message):
    with pytest.raises(ConfigError, match=message) as error:
        grpo(model_dir, *argv)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("cls, key, value, expected", [
    (SFTJobConfig, "packing", True, True),
    (SFTJobConfig, "completion_only_loss", False, False), (DPOJobConfig, "loss_type", "ipo", ["ipo"]),
    (DPOJobConfig, "loss_type", ["sigmoid", "sft"], ["sigmoid", "sft"]),
    (RewardJobConfig, "center_rewards_coefficient", 0.01, 0.01), (GRPOJobConfig, "top_p", 0.9, 0.9),
    (GRPOJobConfig, "mask_truncated_completions", True, True), (GRPOJobConfig, "scale_rewards", False, "none"),
    (GRPOJobConfig, "epsilon_high", 0.28, 0.28), (GRPOJobConfig, "epsilon", "3e-4", 3e-4),
    (GRPOJobConfig, "vllm_importance_sampling_mode", "token_truncate", "token_truncate"),
])
def test_each_job_passes_its_overrides_to_its_trl_class(model_dir, cls, key, value, expected):
    cfg = load_config(cls, [f"--model.name_or_path={model_dir}", f"--trl.overrides.{key}={value}"])
    args = build(cfg.trl_config_class(), {"output_dir": "/tmp", "use_cpu": True, "report_to": []}, cfg.trl.overrides)
    assert getattr(args, key) == expected


def test_sft_assistant_only_loss_needs_conversational_data(model_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"^trl\.overrides\.assistant_only_loss: the task's data are plain"):
        load_config(SFTJobConfig, [f"--model.name_or_path={model_dir}", "--trl.overrides.assistant_only_loss=true"])
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(f'{{"messages": [{{"role": "user", "content": "w{i}"}}, {{"role": "assistant", '
                             f'"content": "W{i}"}}]}}\n' for i in range(20)))
    cfg = load_config(SFTJobConfig, [f"--model.name_or_path={model_dir}", f"--dataset.path={chats}",
                                     "--trl.overrides.assistant_only_loss=true"])
    assert cfg.trl.overrides == {"assistant_only_loss": True}


def test_dpo_loss_type_is_checked_one_by_one(model_dir):
    with pytest.raises(ConfigError, match=r"^trl\.overrides\.loss_type: 'ppo' is not one of 'sigmoid'"):
        load_config(DPOJobConfig, [f"--model.name_or_path={model_dir}", "--trl.overrides.loss_type=[sigmoid, ppo]"])


def test_every_field_whose_values_trl_enumerates_has_its_choices():
    """A field TRL documents a closed set of values for, and checks only mid-run, belongs in CHOICES; the fields
    TRL checks itself at construction, or that rayloop sets, need not."""
    enumerated = {name for name, f in GRPOConfig.__dataclass_fields__.items()
                  if re.search(r"(?:Supported|Possible) (?:values|options) are", f.metadata.get("help", ""))}
    checked_by_trl = {"vllm_mode", "vllm_structured_outputs_regex"}  # refused by __post_init__ or free text
    assert enumerated - checked_by_trl - set(CHOICES["GRPOConfig"]) - set(TRAINING_ARGUMENTS) == set()


@pytest.mark.parametrize("cls, field", [(c, f) for c, fields in CHOICES.items() for f in fields])
def test_choices_are_the_values_trl_documents(cls, field):
    """The table of choices against the help text of the installed TRL: a TRL that adds or drops one fails here."""
    config = {"GRPOConfig": GRPOConfig, "DPOConfig": DPOConfig}[cls]
    text = config.__dataclass_fields__[field].metadata["help"]
    after = re.split(r"(?:values|options) are", text, maxsplit=1)[-1]
    quoted = r"[`']([a-z_]+)'"
    ours = {c for c in CHOICES[cls][field] if isinstance(c, str)}
    assert ours <= set(re.findall(quoted, after)), "a choice of ours that TRL no longer documents"
    assert set(re.findall(quoted, after.split(". ")[0])) <= ours, "a value TRL lists that CHOICES lacks"


def test_reserved_keys_are_what_training_arguments_sets():
    from rayloop.posttrain import training_arguments

    cfg = load_config(SFTJobConfig, ["--model.name_or_path=/x"], context={"model_from_previous_stage": True})
    assert set(training_arguments(cfg, "/tmp/out", precision="fp32")) == set(TRAINING_ARGUMENTS)


@pytest.mark.parametrize("module, cls", [("jobs.sft", SFTJobConfig), ("jobs.dpo", DPOJobConfig),
                                         ("jobs.reward", RewardJobConfig), ("jobs.grpo", GRPOJobConfig)])
def test_every_keyword_a_job_gives_its_trl_class_is_reserved(module, cls, monkeypatch):
    """build_trainer's own keywords (beyond training_arguments) are in the job's trl_reserved, so an override can
    never collide with them mid-run."""
    import importlib

    import rayloop.trl_config as trl_config

    job = importlib.import_module(module)
    seen = {}

    def record(config_cls, rayloop_args, overrides):
        seen.update(rayloop_args)
        raise StopIteration  # the trainer itself is not wanted here

    monkeypatch.setattr(trl_config, "build", record)
    cfg = load_config(cls, ["--model.name_or_path=/x", "--rollout.engine=trainer"] if cls is GRPOJobConfig
                      else ["--model.name_or_path=/x"], context={"model_from_previous_stage": True})
    with pytest.raises(StopIteration):
        job.build_trainer(cfg, "/x", {"output_dir": "/tmp/out", "bf16": False})
    assert set(seen) - {"output_dir", "bf16"} <= set(cls.trl_reserved)


def test_build_refuses_a_key_both_sides_set():
    with pytest.raises(ValueError, match="trl.overrides sets beta, which rayloop sets for GRPOConfig too"):
        build(GRPOConfig, {"beta": 0.1}, {"beta": 0.2})


def test_no_override_is_checked_without_importing_trl(tmp_path, model_dir):
    """Configs without trl.overrides validate without TRL's import (seconds of every job's start)."""
    code = ("import sys; from rayloop.config import load_config; from jobs.grpo import GRPOJobConfig; "
            f"load_config(GRPOJobConfig, ['--model.name_or_path={model_dir}']); print('trl' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"


def test_check_accepts_what_trl_accepts():
    check(GRPOConfig, {"loss_type": "dr_grpo", "scale_rewards": "none", "num_iterations": 2,
                       "importance_sampling_level": "sequence", "epsilon": 3e-4, "epsilon_high": 4e-4}, {})
    check(SFTConfig, {"packing": True}, {"max_length": "train.max_length"})
    check(RewardConfig, {"center_rewards_coefficient": 0.01}, {})
