import importlib
import re
from pathlib import Path

import pytest

from rayloop.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "jobs" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_example_config_opens_with_its_command_and_validates(path):
    first_line = path.read_text().splitlines()[0]
    match = re.search(r"python -m jobs\.(\w+) --config", first_line)
    assert match, f"{path.name} must open with the command that runs it, got {first_line!r}"
    files = re.findall(r"--config (\S+)", first_line)  # a layer names the file it goes on top of first
    assert f"jobs/configs/{path.name}" in files, first_line
    job = importlib.import_module(f"jobs.{match.group(1)}")
    config_class = next(v for k, v in vars(job).items() if k.endswith("Config") and v.__module__ == job.__name__)
    # Post-training configs start from another job's run folder, which a fresh clone has not produced yet.
    root = path.parents[2]
    load_config(config_class, [arg for f in files for arg in ("--config", str(root / f))],
                context={"model_from_previous_stage": True})
