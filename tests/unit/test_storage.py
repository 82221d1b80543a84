"""rayloop.storage on local paths (the s3:// side runs for real in tests/integration/test_multinode.py)."""

from pathlib import Path

import pytest

from rayloop import storage


def test_join_keeps_the_scheme_and_local_paths_become_absolute(tmp_path, monkeypatch):
    assert storage.join("s3://bucket/runs/", "sft", "checkpoint_1") == "s3://bucket/runs/sft/checkpoint_1"
    monkeypatch.chdir(tmp_path)
    assert storage.normalize("runs") == str(tmp_path / "runs")
    assert storage.normalize("s3://bucket/runs/") == "s3://bucket/runs"
    assert storage.normalize(f"file://{tmp_path}/runs") == str(tmp_path / "runs") and not storage.is_uri("file:///x")


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


@pytest.fixture
def s3(monkeypatch, tmp_path):
    """An S3-compatible server (moto) on loopback, in this process, with one bucket; rayloop's cache in tmp_path."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    endpoint = f"http://127.0.0.1:{server.get_host_and_port()[1]}"
    for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                       "RAYLOOP_CACHE": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="runs")
    yield client
    server.stop()


def test_local_copy_from_s3_skips_training_state_and_follows_a_rewritten_folder(s3, tmp_path):
    checkpoint = "sft/checkpoint_1/checkpoint"
    for name, body in {"config.json": b"{}", "model.safetensors": b"w1", "optimizer.pt": b"o" * 1000,
                       "global_step4/zero_pp_rank_0_mp_rank_00_optim_states.pt": b"z"}.items():
        s3.put_object(Bucket="runs", Key=f"{checkpoint}/{name}", Body=body)
    uri = f"s3://runs/{checkpoint}"
    first = storage.local_copy(uri, exclude=storage.training_state)
    assert sorted(p.name for p in Path(first).rglob("*") if p.is_file()) == [".complete", "config.json",
                                                                           "model.safetensors"]
    assert storage.local_copy(uri, exclude=storage.training_state) == first  # cached
    s3.put_object(Bucket="runs", Key=f"{checkpoint}/model.safetensors", Body=b"w2, longer")  # the run written anew
    second = storage.local_copy(uri, exclude=storage.training_state)
    assert second != first and (Path(second) / "model.safetensors").read_bytes() == b"w2, longer"
    one_file = storage.local_copy(f"s3://runs/{checkpoint}/config.json")
    assert Path(one_file).name == "config.json" and Path(one_file).read_text() == "{}"
    with pytest.raises(FileNotFoundError, match="nothing at s3://runs/missing"):
        storage.local_copy("s3://runs/missing")


def test_s3_run_folder_resolves_through_storage(s3):
    from rayloop.models import resolve_model_folder

    s3.put_object(Bucket="runs", Key="base/config.json", Body=b"{}")
    assert resolve_model_folder("s3://runs/base/") == "s3://runs/base"
    with pytest.raises(ValueError, match="no model at 's3://runs/nothing'"):
        resolve_model_folder("s3://runs/nothing")


def test_weights_bytes_counts_the_weight_files_of_a_folder_local_or_in_s3(s3, tmp_path):
    files = {"config.json": b"{}", "model-00001.safetensors": b"w" * 300, "model-00002.safetensors": b"w" * 200,
             "pytorch_model.bin": b"b" * 50, "optimizer.pt": b"o" * 1000, "nested/model.safetensors": b"n" * 7}
    for name, body in files.items():
        s3.put_object(Bucket="runs", Key=f"model/{name}", Body=body)
        (tmp_path / "model" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "model" / name).write_bytes(body)
    assert storage.weights_bytes("s3://runs/model") == storage.weights_bytes(str(tmp_path / "model")) == 550
