import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the integration tests that share it, started as every job starts it."""
    import os

    import ray

    from rayloop.cluster import init_ray

    # Serve behind HAProxy, as cluster.yaml runs it: the Serve tests cover both application shapes through it.
    os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
    # A replica leaving HAProxy keeps serving this long before it stops, so that every HAProxy has reloaded without
    # it. Serve's 30 s covers a cluster's; HAProxy on loopback reloads in ~0.5 s, and each rolling update and
    # teardown of the Serve tests would otherwise wait the 30 s.
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "5")
    init_ray()
    yield ray
    ray.shutdown()


# Post-training starts from a trained model: one pretraining run and one SFT run on the tiny task, shared by the
# post-training tests (the tiny pipeline's own configs, with a smaller held-out split).
POSTTRAIN_TASK = ['--task.ops=["+"]', "--task.num_train=4000", "--task.num_eval=300"]


@pytest.fixture(scope="session")
def posttrain_runs(tmp_path_factory):
    return tmp_path_factory.mktemp("posttrain-runs")


def posttrain_config(cls, config_file: str, runs, *overrides):
    from rayloop.config import load_config

    return load_config(cls, ["--config", f"jobs/configs/{config_file}", f"--storage.path={runs}", *POSTTRAIN_TASK,
                             *overrides])


@pytest.fixture(scope="session")
def pretrain_result(ray_cluster, posttrain_runs) -> dict:
    """pretrain_tiny.yaml, 2 workers, ZeRO-2, 300 steps: tested in test_pretrain_and_generate.py, the start of
    every post-training test."""
    from jobs import pretrain

    cfg = posttrain_config(pretrain.PretrainConfig, "pretrain_tiny.yaml", posttrain_runs, "--train.steps=300",
                           "--scaling.num_workers=2", "--deepspeed.zero_stage=2")
    return pretrain.main(cfg)


@pytest.fixture(scope="session")
def pretrained_model(pretrain_result) -> str:
    return pretrain_result["model_dir"]


@pytest.fixture(scope="session")
def sft_result(pretrained_model, posttrain_runs) -> dict:
    from jobs import sft

    cfg = posttrain_config(sft.SFTJobConfig, "sft_tiny.yaml", posttrain_runs, f"--model.name_or_path={pretrained_model}",
                           "--train.steps=600", "--train.checkpoint_every=300")
    return sft.main(cfg)
