"""cluster.yaml and platform/clusters/local.yaml: valid for `ray up`, token on every node, filtered sync."""

from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import fillout_defaults, validate_config

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ["cluster.yaml", "platform/clusters/local.yaml"]


@pytest.mark.parametrize("name", CONFIGS)
def test_cluster_configs_are_valid_ray_up_configs(name):
    config = yaml.safe_load((ROOT / name).read_text())
    validate_config(fillout_defaults(config))  # Ray's own schema check (ray/autoscaler/ray-schema.json), as `ray up`
    assert "--dashboard-host=127.0.0.1" in config["head_start_ray_commands"][0]
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "RAY_SERVE_ENABLE_HA_PROXY=1" in command  # Serve's fast path, on every node
        assert "RAYLOOP_STORAGE=s3://" in command  # the bucket, as the default storage.path of every job


@pytest.mark.parametrize("name", CONFIGS)
def test_every_node_reads_the_same_token_and_sync_skips_ignored_files(name):
    config = yaml.safe_load((ROOT / name).read_text())
    # file_mounts reach every node the autoscaler starts, workers included: the token is there before `ray start`.
    token_on_nodes = [remote for remote, local in config["file_mounts"].items() if local == "~/.ray/auth_token"]
    assert token_on_nodes == ["/home/ubuntu/.ray/auth_token"], config["file_mounts"]
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=~/.ray/auth_token" in command, command
    assert config["rsync_filter"] == [".gitignore"]  # the checkout without .venv (~4 GB) or runs
    assert ".venv/" in (ROOT / ".gitignore").read_text().splitlines()
    for command in config["setup_commands"]:
        assert "[gpu]" in command or "venv/bin/activate" in command  # the pinned GPU stack on every node


@pytest.mark.parametrize("name", CONFIGS)
def test_the_head_serves_the_model_registry_on_loopback_and_jobs_register_there(name):
    config = yaml.safe_load((ROOT / name).read_text())
    server = next(c for c in config["head_setup_commands"] if "mlflow server" in c)
    assert "--host 127.0.0.1 --port 5000" in server and "sqlite:///" in server
    assert "MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in config["head_start_ray_commands"][0]


def test_head_of_the_cloud_cluster_schedules_nothing_heavy_and_workers_can_reach_the_bucket():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}
    # The autoscaler gives only the head an instance profile; GPU workers write checkpoints to the bucket too.
    assert "IamInstanceProfile" in config["available_node_types"]["gpu_worker"]["node_config"]
