"""rayloop.storage on local paths (the s3:// side runs for real in tests/integration/test_multinode.py)."""

import pytest

from rayloop import storage


def test_join_keeps_the_scheme_and_local_paths_become_absolute(tmp_path, monkeypatch):
    assert storage.join("s3://bucket/runs/", "sft", "checkpoint_1") == "s3://bucket/runs/sft/checkpoint_1"
    monkeypatch.chdir(tmp_path)
    assert storage.normalize("runs") == str(tmp_path / "runs")
    assert storage.normalize("s3://bucket/runs/") == "s3://bucket/runs"


def test_write_read_upload_and_copy_within_local_storage(tmp_path):
    storage.write_json(str(tmp_path / "run" / "results.json"), {"step": 3})
    assert storage.is_file(str(tmp_path / "run" / "results.json"))
    assert '"step": 3' in storage.read_text(str(tmp_path / "run" / "results.json"))
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "events").write_text("e")
    storage.upload(tmp_path / "logs", str(tmp_path / "run" / "tensorboard"))
    storage.copy(str(tmp_path / "run" / "tensorboard" / "events"), str(tmp_path / "run" / "ckpt" / "events"))
    assert (tmp_path / "run" / "ckpt" / "events").read_text() == "e"
    assert storage.is_dir(str(tmp_path / "run")) and not storage.exists(str(tmp_path / "nope"))


def test_local_copy_of_a_local_folder_is_the_folder_and_a_missing_one_names_the_node(tmp_path):
    assert storage.local_copy(str(tmp_path)) == str(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"does not exist on node .*shared mount or s3://"):
        storage.local_copy(str(tmp_path / "driver-only"))


def test_unknown_storage_schemes_are_refused_by_the_config():
    from jobs.pretrain import PretrainConfig
    from rayloop.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"storage.path: .*s3://"):
        load_config(PretrainConfig, ["--storage.path=ftp://host/runs"])
    assert load_config(PretrainConfig, ["--storage.path=s3://b/runs/"]).storage.run_dir() == "s3://b/runs/pretrain"


def test_storage_path_defaults_to_the_environment(monkeypatch):
    from jobs.pretrain import PretrainConfig
    from rayloop.config import load_config

    monkeypatch.setenv("RAYLOOP_STORAGE", "s3://bucket/rayloop-runs")
    assert load_config(PretrainConfig, []).storage.run_dir() == "s3://bucket/rayloop-runs/pretrain"
