"""rayloop/registry.py against a real MLflow registry (SQLite in the test's folder): registration with lineage,
references, alias history, the rollback stack."""

from __future__ import annotations

import pytest

from rayloop import registry
from rayloop.config import JobError


@pytest.fixture()
def uri(tmp_path):
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _job_config(tmp_path, name: str, model: str):
    from jobs.pretrain import PretrainConfig
    from rayloop.config import load_config

    return load_config(PretrainConfig, [f"--storage.path={tmp_path}", f"--storage.name={name}",
                                        f"--registry.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                                        f"--registry.model={model}"])


def test_each_registration_names_its_parent_and_keeps_figures_and_config(tmp_path, uri):
    base = _job_config(tmp_path, "pretrain-a", "m")
    first = registry.register(base, {"model_dir": str(tmp_path / "a" / "hf"), "eval_loss": 1.5},
                              job="pretrain", parent="preset:tiny")
    second = registry.register(_job_config(tmp_path, "sft-a", "m"),
                               {"model_dir": str(tmp_path / "b"), "exact_match": {"before": 0.1, "after": 0.5}},
                               job="sft", parent=str(tmp_path / "a" / "hf"))
    assert (first, second) == ("m@1", "m@2")
    mlflow = registry.client(uri)
    chain = registry.lineage(mlflow, "m@2")
    assert [(str(v.version), v.tags["job"], v.tags["parent"]) for v in chain] == [("2", "sft", "m@1"),
                                                                                  ("1", "pretrain", "preset:tiny")]
    assert registry.version_metrics(mlflow, chain[0])["exact_match.after"] == 0.5
    assert "storage:" in chain[1].tags["config"] and chain[1].tags["git_commit"]
    assert registry.get_version(mlflow, "m").version == chain[0].version  # a bare name: the newest


def test_a_model_under_another_name_finds_its_parent_version(tmp_path, uri):
    policy = registry.register(_job_config(tmp_path, "sft-a", "policy"), {"model_dir": str(tmp_path / "sft")},
                               job="sft", parent="preset:tiny")
    scorer = registry.register(_job_config(tmp_path, "reward-a", "scorer"), {"model_dir": str(tmp_path / "rm")},
                               job="reward", parent=str(tmp_path / "sft"))
    chain = registry.lineage(registry.client(uri), scorer)
    assert [f"{v.name}@{v.version}" for v in chain] == [scorer, policy] == ["scorer@1", "policy@1"]


def test_a_registry_that_is_down_leaves_the_model_and_says_so(tmp_path, capsys):
    cfg = _job_config(tmp_path, "p", "m")
    cfg.registry.uri = "http://127.0.0.1:1"
    assert registry.register(cfg, {"model_dir": str(tmp_path)}, job="pretrain", parent="preset:tiny") is None
    assert "was not registered in http://127.0.0.1:1" in capsys.readouterr().out


def test_alias_moves_are_recorded_in_order_and_rollback_follows_the_stack(tmp_path, uri):
    mlflow = registry.client(uri)
    mlflow.create_registered_model("m")
    for _ in range(3):
        mlflow.create_model_version("m", source=str(tmp_path))
    moves = [("serve up", 1), ("promote", 2), ("promote", 3), ("rollback", 2), ("rollback", 1)]
    for action, version in moves:
        registry.move_alias(mlflow, "m", "prod", version, action=action)
    history = registry.alias_history(mlflow, "m", "prod")
    assert [(h["action"], h["from"], h["to"]) for h in history] == [
        ("serve up", None, "1"), ("promote", "1", "2"), ("promote", "2", "3"), ("rollback", "3", "2"),
        ("rollback", "2", "1")]
    assert all("@" in h["who"] and h["when"] for h in history)
    assert registry.served_stack(history) == ["1"]  # nothing left to roll back to
    assert registry.served_stack(history[:4]) == ["1", "2"]  # after one rollback, the next goes to 1, not 3
    assert str(registry.get_version(mlflow, "m@prod").version) == "1"


def test_references_that_name_nothing_are_one_line(uri):
    mlflow = registry.client(uri)
    for ref, message in (("m@1", "unknown model 'm'"), ("", "expected <model>@")):
        with pytest.raises(JobError, match=message):
            registry.get_version(mlflow, ref)


@pytest.mark.parametrize("name", ["demo.v2", "3", "latest", "v3", "a b"])
def test_endpoint_names_mlflow_would_refuse_or_misread_are_refused_before_anything(name):
    with pytest.raises(JobError, match="endpoint name"):
        registry.check_alias(name)


def test_a_failed_alias_move_leaves_no_record(tmp_path, uri):
    mlflow = registry.client(uri)
    mlflow.create_registered_model("m")
    mlflow.create_model_version("m", source=str(tmp_path))
    with pytest.raises(Exception):
        registry.move_alias(mlflow, "m", "prod", 9, action="promote")  # no version 9
    assert registry.alias_history(mlflow, "m", "prod") == []
