from PIL import Image

from rayloop.tracking import Tracker, plot_curves


def test_disabled_tracker_does_nothing():
    tracker = Tracker("/nonexistent/never-created", enabled=False)
    tracker.log(1, {"loss": 1.0})
    tracker.advance()
    tracker.close()
    assert tracker.history == {}


def test_plot_writes_a_png(tmp_path):
    history = {"loss": [(1, 3.0), (2, 2.0), (3, 1.5)], "eval_loss": [(3, 1.7)]}
    path = plot_curves(history, ["loss", "eval_loss", "absent"], str(tmp_path / "loss.png"), title="t")
    assert Image.open(path).size == (700, 400)
    assert plot_curves({}, ["loss"], str(tmp_path / "none.png")) is None


def test_resumed_history_continues(tmp_path):
    tracker = Tracker(str(tmp_path / "tb"), initial_step=2, history={"loss": [[1, 3.0], [2, 2.0]]})
    tracker.log(3, {"loss": 1.5})
    tracker.advance()
    tracker.close()
    assert tracker.history["loss"] == [(1, 3.0), (2, 2.0), (3, 1.5)]
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
