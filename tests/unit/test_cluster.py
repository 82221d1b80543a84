from rayloop.cluster import PACKAGE_DIR, REPO_ROOT, local_num_cpus, runtime_env


def test_runtime_env_ships_live_source(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    env = runtime_env()
    assert env["py_modules"] == [str(PACKAGE_DIR)]
    assert env["working_dir"] == str(REPO_ROOT) and (REPO_ROOT / "jobs" / "pretrain.py").is_file()


def test_inside_a_submitted_job_the_job_brings_the_working_dir(monkeypatch):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {"working_dir": "x"}}')
    assert "working_dir" not in runtime_env()  # the two would conflict; Ray merges py_modules in


def test_local_cluster_declares_enough_logical_cpus():
    assert local_num_cpus(None) >= 8
    assert local_num_cpus(3) == 3
