import pytest


@pytest.fixture
def model_dir(tmp_path):
    """A run folder as a job leaves it (one Ray Train checkpoint holding an HF folder), named like the SFT run."""
    folder = tmp_path / "sft-tiny" / "checkpoint_2026-01-01_00-00-00.000000" / "checkpoint"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    return tmp_path / "sft-tiny"
