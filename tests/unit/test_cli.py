"""The `rayloop` command's bad uses, each one line on stderr and a non-zero exit, against a real MLflow registry
(SQLite in the test's folder) and addresses where nothing listens. The good uses run against real clusters in
tests/integration (test_endpoint.py, test_multinode.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from rayloop import registry
from rayloop.cli import main


@pytest.fixture()
def registry_uri(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow = registry.client(uri)
    mlflow.create_registered_model("tiny")
    (tmp_path / "model").mkdir()
    mlflow.create_model_version("tiny", source=str(tmp_path / "model"), tags={"job": "pretrain",
                                                                             "parent": "preset:tiny"})
    mlflow.create_model_version("tiny", source=str(tmp_path / "model2"), tags={"job": "sft", "parent": "tiny@1"})
    return uri


# A line Ray forwards to this process's stderr from one of its own, e.g. `(raylet) ... file_system_monitor.cc: ...`
# on a nearly full disk: under `make test` the integration tests' cluster is still up when these tests run.
RAY_FORWARDED = re.compile(r"^(?:\x1b\[[0-9;]*m)?\((?:raylet[^)]*|autoscaler[^)]*|[^)]*pid=[^)]+)\)")


def one_line_error(capsys, argv: list[str], code: int = 1) -> str:
    assert main(argv) == code
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not RAY_FORWARDED.match(line)]
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("ref, message", [("nope@1", "unknown model 'nope'"), ("tiny@7", "no version '7'"),
                                          ("tiny@prod", "no alias 'prod'"), ("@1", "expected <model>@<version")])
def test_unknown_model_version_or_alias(capsys, registry_uri, ref, message):
    assert message in one_line_error(capsys, ["models", "show", ref, "--registry", registry_uri])


def test_show_prints_the_lineage_back_to_the_base(capsys, registry_uri):
    assert main(["models", "show", "tiny@2", "--registry", registry_uri]) == 0
    out = capsys.readouterr().out
    lineage = out.split("lineage:")[1].splitlines()
    assert "tiny@2" in lineage[1] and "tiny@1" in lineage[2] and "base: preset:tiny" in lineage[3], out


def test_registry_not_reachable_in_seconds(capsys):
    started = time.monotonic()
    line = one_line_error(capsys, ["models", "list", "--registry", "http://127.0.0.1:1"])
    assert "model registry at 'http://127.0.0.1:1' is not reachable" in line
    assert time.monotonic() - started < 30


def test_ray_not_reachable_before_anything_moves(registry_uri):
    # A process of its own: in this one a test may have joined Ray already, and joining is once per process.
    started = time.monotonic()
    out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "rayloop"), "promote", "tiny@2", "--endpoint",
                          "prod", "--registry", registry_uri], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "RAY_ADDRESS": "127.0.0.1:1"})
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1, out.stderr
    assert "Ray is not reachable at '127.0.0.1:1'" in lines[0] and time.monotonic() - started < 30
    assert registry.alias_history(registry.client(registry_uri), "tiny", "prod") == []


def test_job_api_not_reachable(capsys):
    line = one_line_error(capsys, ["status", "raysubmit_x", "--address", "http://127.0.0.1:1"])
    assert "job API at http://127.0.0.1:1 refused or did not answer" in line


def test_unknown_job_and_bad_overrides_exit_2(capsys):
    assert "unknown job 'nope'" in one_line_error(capsys, ["submit", "nope"], code=2)
    assert "unexpected argument" in one_line_error(capsys, ["submit", "sft", "train.steps=3"], code=2)
    assert "--env" in one_line_error(capsys, ["submit", "sft", "--env", "NOEQUALS"], code=2)


def test_the_console_script_is_installed():
    out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "rayloop"), "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "promote" in out.stdout and "rollback" in out.stdout
