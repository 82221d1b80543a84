import subprocess
import sys
from pathlib import Path

import pytest

from jobs.pretrain import PretrainConfig
from rayloop.config import ConfigError, load_config, parse_args

ROOT = Path(__file__).resolve().parents[2]


def test_yaml_then_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.01\ntrain:\n  steps: 5\n")
    cfg = load_config(PretrainConfig, ["--config", str(path), "--optim.lr=3e-4", "--deepspeed.zero_stage", "3"])
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.train.steps == 5
    assert cfg.deepspeed.zero_stage == 3
    assert cfg.storage.name == "pretrain"  # the job's name is the default run name


def test_override_values_parse_as_yaml():
    _, overrides = parse_args(["--a.b=true", "--a.c=[1, 2]", "--a.d", "null", "--a.e=x"])
    assert overrides == {"a.b": True, "a.c": [1, 2], "a.d": None, "a.e": "x"}


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--optim.learning_rate=1"], "optim.learning_rate: unknown key"),
        (["--bogus=1"], "bogus: unknown key"),
        (["--optim.lr=abc"], "optim.lr: Input should be a valid number"),
        (["--optim.lr=-1"], "optim.lr: Input should be greater than 0"),
        (["--deepspeed.zero_stage=5"], "deepspeed.zero_stage"),
        (["--deepspeed.overrides={bf16: {enabled: true}}"], "deepspeed.overrides sets bf16: use deepspeed.precision"),
        (["--scaling.num_workers=0"], "scaling.num_workers"),
        (["--model.name_or_path=/nonexistent"], "model.name_or_path"),
        (["--train.global_batch_size=7"], "train.global_batch_size (7) must be divisible"),
        (["--config", "/nonexistent.yaml"], "--config: no such file"),
        (["--optim.lr"], "--optim.lr: missing value"),
        (["positional"], "unexpected argument"),
    ],
)
def test_bad_config_names_the_field(argv, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(PretrainConfig, argv)
    assert fragment in str(info.value), f"expected {fragment!r} in {str(info.value)!r}"
    assert "\n" not in str(info.value)


def test_wrong_yaml_shape(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(PretrainConfig, ["--config", str(path)])


@pytest.mark.parametrize("argv", [["--deepspeed.zero_stage=5"], ["--config", "missing.yaml"], ["--optim.lrr=1"]])
def test_job_exits_with_one_line_before_ray_starts(argv):
    # An unreachable RAY_ADDRESS: had the job got as far as Ray, it would fail differently and much later.
    env = {"RAY_ADDRESS": "127.0.0.1:1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "jobs.pretrain", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: "), proc.stderr
    assert proc.stdout == ""


def test_help_lists_every_field_with_its_description():
    proc = subprocess.run([sys.executable, "-m", "jobs.pretrain", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    assert "--deepspeed.zero_stage  (default 2)  ZeRO stage" in proc.stdout
    assert "--optim.lr" in proc.stdout


def test_data_path_must_exist_for_file_sources(tmp_path):
    with pytest.raises(ConfigError, match="data.path: no such file"):
        load_config(PretrainConfig, ["--data.source=text", f"--data.path={tmp_path}/missing.txt"])
    with pytest.raises(ConfigError, match="data.path is required"):
        load_config(PretrainConfig, ["--data.source=hf"])
    (tmp_path / "docs.jsonl").write_text('{"body": "a document"}\n')
    with pytest.raises(ConfigError, match="data.text_field: no column 'text' in .*docs.jsonl"):
        load_config(PretrainConfig, ["--data.source=json", f"--data.path={tmp_path}"])
    assert load_config(PretrainConfig, ["--data.source=json", f"--data.path={tmp_path}", "--data.text_field=body"])
    with pytest.raises(ConfigError, match="holds no .parquet file"):
        load_config(PretrainConfig, ["--data.source=parquet", f"--data.path={tmp_path}"])
    with pytest.raises(ConfigError, match="offload_param needs"):
        load_config(PretrainConfig, ["--deepspeed.offload_param=true"])


def test_config_files_merge_in_order_then_dotted_overrides(tmp_path):
    base, overlay = tmp_path / "base.yaml", tmp_path / "overlay.yaml"
    base.write_text("optim: {lr: 0.01, warmup_steps: 3}\ntrain: {steps: 7}\ndeepspeed: {overrides: {a: 1}}\n")
    overlay.write_text("optim: {lr: 0.02}\ndeepspeed: {overrides: {b: 2}}\n")
    cfg = load_config(PretrainConfig, ["--config", str(base), "--config", str(overlay), "--train.steps=9"])
    # A section in both merges key by key; the later file wins a key both set; the command line wins last.
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.train.steps) == (0.02, 3, 9)
    assert cfg.deepspeed.overrides == {"a": 1, "b": 2}
    assert parse_args(["--config", "a", "--x.y=1", "--config", "b"]) == (["a", "b"], {"x.y": 1})
    with pytest.raises(ConfigError, match=r"--config: no such file '.*missing.yaml'"):
        load_config(PretrainConfig, ["--config", str(base), "--config", str(tmp_path / "missing.yaml")])


def test_pipeline_seed_reaches_every_stage_but_not_the_task_split():
    from jobs.pipeline import PipelineConfig

    cfg = load_config(PipelineConfig, ["--config", "jobs/configs/pipeline_tiny.yaml", "--seed=3"])
    assert (cfg.model.seed, cfg.data.seed, cfg.task.seed) == (3, 3, 0)
    assert [(name, stage.train.seed, stage.task.seed) for name, stage in cfg._stages] == [("sft", 3, 0),
                                                                                          ("grpo", 3, 0)]
    unseeded = load_config(PipelineConfig, ["--config", "jobs/configs/pipeline_tiny.yaml"])
    assert [stage.train.seed for _, stage in unseeded._stages] == [0, 0]


def test_pipeline_stage_config_files_merge_in_order():
    """The demo's SFT stage is sft_tiny.yaml with the headroom layer on top: its stop, and sft_tiny's steps."""
    from jobs.pipeline import PipelineConfig

    cfg = load_config(PipelineConfig, ["--config", "jobs/configs/pipeline_tiny.yaml"])
    sft = dict(cfg._stages)["sft"]
    assert (sft.train.stop_at_exact_match, sft.train.checkpoint_every, sft.train.steps) == (0.7, 50, 1200)
    single = load_config(PipelineConfig, ["--config", "jobs/configs/pipeline_tiny.yaml",
                                          "--sft_config=jobs/configs/sft_tiny.yaml"])
    assert dict(single._stages)["sft"].train.stop_at_exact_match is None
    with pytest.raises(ConfigError, match=r"sft_config: name at least one config file"):
        load_config(PipelineConfig, ["--config", "jobs/configs/pipeline_tiny.yaml", "--sft_config=[]"])
