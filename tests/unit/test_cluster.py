from pathlib import Path

from rayloop.cluster import PACKAGE_DIR, REPO_ROOT, local_num_cpus, runtime_env


def test_runtime_env_ships_live_source(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.chdir(REPO_ROOT)
    env = runtime_env()
    assert env["py_modules"] == [str(PACKAGE_DIR)]
    assert env["working_dir"] == str(REPO_ROOT) and (REPO_ROOT / "jobs" / "pretrain.py").is_file()


def test_a_local_run_from_a_users_folder_ships_that_folder_and_rayloops_jobs(monkeypatch, tmp_path):
    import jobs  # noqa: F401 - imported, as `python -m jobs.grpo` has by then

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.chdir(tmp_path)
    env = runtime_env()
    assert env["working_dir"] == str(tmp_path.resolve()) and "excludes" not in env
    assert str(REPO_ROOT / "jobs") in env["py_modules"]


def test_inside_a_submitted_job_the_job_brings_the_working_dir(monkeypatch):
    import jobs

    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {"working_dir": "x"}}')
    monkeypatch.chdir(REPO_ROOT)  # the checkout is the working dir: its jobs/ travels with it
    assert "working_dir" not in runtime_env()  # the two would conflict; Ray merges py_modules in
    assert runtime_env()["py_modules"] == [str(PACKAGE_DIR)]  # nor serve/, also there
    assert Path(jobs.__file__).resolve().parent == REPO_ROOT / "jobs"


def test_a_job_from_a_users_own_folder_ships_rayloops_jobs(monkeypatch, tmp_path):
    import jobs  # noqa: F401 - imported, as `python -m jobs.grpo` has by then

    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {"working_dir": "x"}}')
    monkeypatch.chdir(tmp_path)  # the user's folder: data and rewards, no jobs/
    modules = runtime_env()["py_modules"]
    assert modules[0] == str(PACKAGE_DIR) and str(REPO_ROOT / "jobs") in modules, modules


def test_local_cluster_declares_enough_logical_cpus():
    assert local_num_cpus(None) >= 8
    assert local_num_cpus(3) == 3


def test_joining_a_cluster_ships_no_local_folder_but_rayloops_jobs(monkeypatch):
    import jobs  # noqa: F401 - imported, as `python -m jobs.pretrain` has by then

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.chdir(REPO_ROOT)
    env = runtime_env(joining=True)
    assert "working_dir" not in env and str(REPO_ROOT / "jobs") in env["py_modules"]
