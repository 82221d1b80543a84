"""What a person watches during and after a run: TensorBoard event files, the stage's progress bar, PNG curves.

Only rank 0 tracks; other ranks get a `Tracker(enabled=False)` whose calls do nothing, so loops need no `if rank == 0`.
"""

from __future__ import annotations

import os
from collections import defaultdict


class Tracker:
    def __init__(self, log_dir: str | None, *, initial_step: int = 0, history: dict[str, list] | None = None,
                 enabled: bool = True, progress=None):
        """`history`: the metric history of a resumed run (as saved in its checkpoint), continued from there.
        `progress`: a `console.StepReporter`, which feeds the bar the driver draws."""
        self.enabled = enabled
        self.step = initial_step
        self._progress = progress
        self.history: dict[str, list[tuple[int, float]]] = defaultdict(list)
        if enabled:
            self.history.update({k: [tuple(p) for p in points] for k, points in (history or {}).items()})
        self._writer = None
        if not enabled:
            return
        if log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(log_dir, exist_ok=True)
            self._writer = SummaryWriter(log_dir)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record metrics (history, TensorBoard) and show the loss, when present, on the bar."""
        if not self.enabled:
            return
        for key, value in metrics.items():
            self.history[key].append((step, float(value)))
            if self._writer is not None:
                self._writer.add_scalar(key, value, step)
        if "loss" in metrics and self._progress is not None:
            self._progress.update(step, loss=metrics["loss"])

    def advance(self, steps: int = 1) -> None:
        self.step += steps
        if self.enabled and self._progress is not None:
            self._progress.update(self.step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self.enabled and self._progress is not None:
            self._progress.update(self.step, force=True)
        if self._writer is not None:
            self._writer.close()


def plot_curves(history: dict[str, list[tuple[int, float]]], keys: list[str], path: str, title: str = "") -> str | None:
    """One PNG with a line per key (those present), step on x. Returns the path, or None if nothing to draw."""
    series = {k: history[k] for k in keys if history.get(k)}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, points in series.items():
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 20 else None, label=key)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def log_dir_for(run_dir: str) -> str:
    """Where this process writes TensorBoard files and PNG curves: the run's `tensorboard/` folder when storage is
    a local folder or mount, else a new folder on this node that `sync_logs` copies to the run in storage
    (TensorBoard and matplotlib write local files). New for each attempt, so nothing of an older run comes along."""
    import tempfile

    from rayloop import storage

    if not storage.is_uri(run_dir):
        return storage.join(run_dir, "tensorboard")
    return tempfile.mkdtemp(prefix="rayloop-logs-")


def sync_logs(log_dir: str, run_dir: str, *, last: bool = False, upload: bool = True) -> None:
    """Copy this node's log folder to `<run_dir>/tensorboard` when storage is remote (a no-op otherwise); `last`:
    the attempt is over, so the local folder goes too. Ranks that log nothing call it with `upload=False`."""
    import shutil

    from rayloop import storage

    if not storage.is_uri(run_dir) or not os.path.isdir(log_dir):
        return
    if upload:
        storage.upload(log_dir, storage.join(run_dir, "tensorboard"))
    if last:
        shutil.rmtree(log_dir, ignore_errors=True)
