from pathlib import Path

import yaml
from ray.autoscaler._private.util import fillout_defaults, validate_config

ROOT = Path(__file__).resolve().parents[2]


def test_cluster_yaml_is_a_valid_ray_up_config():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(fillout_defaults(config))  # Ray's own schema check, as `ray up` runs it
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}
    assert "--dashboard-host=127.0.0.1" in config["head_start_ray_commands"][0]
    for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        assert "RAY_SERVE_ENABLE_HA_PROXY=1 ray start" in command  # Serve's fast path, on every node
