import json

import pytest
from ray.train import Checkpoint

from jobs.sft import SFTJobConfig
from rayloop.config import load_config
from rayloop.posttrain import stopped_at_target


def _checkpoint(tmp_path, history: list[dict]) -> Checkpoint:
    folder = tmp_path / "checkpoint_000"
    (folder / "checkpoint").mkdir(parents=True)
    (folder / "checkpoint" / "trainer_state.json").write_text(json.dumps({"global_step": 50, "log_history": history}))
    return Checkpoint.from_directory(str(folder))


@pytest.mark.parametrize("history,target,stopped", [
    ([{"eval_exact_match": 0.2, "step": 50}, {"eval_exact_match": 0.72, "step": 100}], 0.7, True),
    # the last measurement decides, not the best one
    ([{"eval_exact_match": 0.75, "step": 50}, {"eval_exact_match": 0.6, "step": 100}], 0.7, False),
    ([{"eval_exact_match": 0.72, "step": 100}, {"loss": 0.1, "step": 100}], 0.7, True),
    ([{"loss": 0.1, "step": 100}], 0.7, False),
    ([{"eval_exact_match": 0.9, "step": 100}], None, False),
])
def test_a_resumed_run_that_reached_its_exact_match_target_stays_stopped(tmp_path, history, target, stopped):
    cfg = load_config(SFTJobConfig, ["--config", "jobs/configs/sft_tiny.yaml",
                                     f"--train.stop_at_exact_match={'null' if target is None else target}"],
                      context={"model_from_previous_stage": True})
    assert stopped_at_target(cfg, _checkpoint(tmp_path, history)) is stopped
