import json

import pytest


def register_checkpoints(run_dir, *names: str) -> None:
    """Ray Train's record of a run (checkpoint_manager_snapshot.json, as Ray 2.60 writes it) naming `names` as its
    registered checkpoints, the last one the latest."""
    import ray

    results = [{"version": 0, "checkpoint_dir_name": name, "metrics": {"step": i + 1}} for i, name in enumerate(names)]
    snapshot = {"ray_version": ray.__version__, "checkpoint_results": results,
                "checkpoint_report_indices": list(range(len(names))), "latest_checkpoint_result": results[-1],
                "pending_training_results": [], "pending_validation_specs": [], "current_report_index": len(names),
                "validated_checkpoint_dir_names": [], "timed_out_validation_checkpoint_dir_names": [],
                "failed_validation_checkpoint_dir_names": []}
    (run_dir / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))


@pytest.fixture
def model_dir(tmp_path):
    """A run folder as a job leaves it (one registered Ray Train checkpoint holding an HF folder), named like the
    SFT run."""
    name = "checkpoint_2026-01-01_00-00-00.000000"
    folder = tmp_path / "sft-tiny" / name / "checkpoint"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    register_checkpoints(tmp_path / "sft-tiny", name)
    return tmp_path / "sft-tiny"
