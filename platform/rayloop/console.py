"""What a job shows its user: its own lines and one progress bar per stage; everything else goes to a log file.

A job's process collects the output of Ray (worker and actor logs are forwarded to the driver), vLLM, DeepSpeed,
TRL and transformers: thousands of lines for the tiny demo. Unless the job runs with `--verbose`, `quiet_into`
points this process's stdout and stderr (the file descriptors, so C++ logs and child processes follow) at a log
file, and keeps the terminal for `say` lines and the stage bars. Uncaught errors still reach the terminal in one
line (see `run_cli`), with the log file's path.

Training runs in Ray Train workers, often on other nodes, so a stage's bar is drawn here from what rank 0 sends to
a small actor (`ProgressBoard`) with each step, with any line it has for the user; Ray's own `tqdm_ray` draws its
bar through the forwarded log stream, which is exactly what goes to the file.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import IO, Any, Iterator

_terminal: dict[str, IO[str]] = {}
_log_path: str | None = None


def quiet_into(log_path: str) -> str:
    """Send this process's stdout and stderr to `log_path` (appended); `say` keeps writing to the terminal."""
    global _log_path
    if _terminal:
        return _log_path or log_path
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    _terminal["out"] = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8", errors="replace")
    _terminal["err"] = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="replace")
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    _log_path = log_path
    return log_path


def terminal(err: bool = False) -> IO[str]:
    return _terminal.get("err" if err else "out") or (sys.stderr if err else sys.stdout)


def say(line: str, *, err: bool = False) -> None:
    """A line for the user: on the terminal (above a live bar, which is redrawn under it), and in the log file
    too, so the log reads whole."""
    from tqdm import tqdm

    out = terminal(err)
    with tqdm.external_write_mode(file=terminal(err=True)):  # where bars are drawn
        print(line, file=out, flush=True)
    if _terminal:
        print(line, file=sys.stderr if err else sys.stdout, flush=True)


def elapsed(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


@contextmanager
def bar(description: str, total: int | None, unit: str = "step") -> Iterator[Any]:
    """A tqdm bar on the terminal, closed when the block ends. Redrawn in place on a terminal; written every
    30 s into a file or pipe (CI logs), where each redraw is a new line. None is drawn with `--verbose` (or in a
    process whose output was left where it was): Ray's forwarded lines would cut through it."""
    from tqdm import tqdm

    out = terminal(err=True)
    tty = out.isatty()
    progress = tqdm(total=total, desc=description, unit=unit, file=out, dynamic_ncols=tty, leave=True,
                    mininterval=0.5 if tty else 30.0, ncols=None if tty else 100, disable=not _terminal)
    try:
        yield progress
    finally:
        progress.close()


# ---------------------------------------------------------------------------------------------------------------
# A Ray Train run's bar: rank 0 sends its step (and loss or reward) to a ProgressBoard; the driver draws it.
# ---------------------------------------------------------------------------------------------------------------


class ProgressBoard:
    """The latest step of a run and the figures shown beside it (a Ray actor, created by `stage_bar`)."""

    def __init__(self):
        self.step, self.figures, self.lines = 0, {}, []

    def update(self, step: int, figures: dict[str, float]) -> None:
        self.step = max(self.step, step)
        self.figures.update(figures)

    def post(self, line: str) -> None:
        self.lines.append(line)

    def read(self, lines_seen: int = 0) -> tuple[int, dict[str, float], list[str]]:
        return self.step, self.figures, self.lines[lines_seen:]


class StepReporter:
    """Worker side: `update(step, loss=...)` sends at most twice a second (and always the last step), without
    waiting for an answer; a run without a board (or a rank other than 0) gets one that does nothing."""

    def __init__(self, board=None, total: int | None = None):
        self.board, self.total, self.sent, self.figures = board, total, 0.0, {}

    def update(self, step: int, *, force: bool = False, **figures: float) -> None:
        if self.board is None:
            return
        self.figures.update({k: float(v) for k, v in figures.items() if v is not None})
        now = time.monotonic()
        if now - self.sent < 0.5 and step != self.total and not force:
            return
        self.sent = now
        try:
            self.board.update.remote(step, dict(self.figures))
        except Exception:  # noqa: BLE001 - the bar is for people; a board gone with its driver stops nothing
            self.board = None

    def say(self, line: str) -> None:
        """A line for the job's user, shown by the driver (above the bar) and in its log."""
        if self.board is None:
            return
        try:
            self.board.post.remote(line)
        except Exception:  # noqa: BLE001
            self.board = None


def reporter(loop_config: dict, rank: int, total: int | None) -> StepReporter:
    return StepReporter(loop_config.get("progress") if rank == 0 else None, total)


def _show(progress, figures: dict[str, float]) -> None:
    progress.set_postfix({k: f"{v:.3g}" for k, v in figures.items()}, refresh=False)


@contextmanager
def stage_bar(description: str, total: int) -> Iterator[Any]:
    """A board for a Ray Train run and the bar that follows it: yields the board's handle, to pass to the train
    loop as `loop_config["progress"]`. Ray must be up."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # On this node: the bar must not die with a worker node.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    board = ray.remote(num_cpus=0)(ProgressBoard).options(scheduling_strategy=here).remote()
    done = threading.Event()

    lines_said = 0

    def read() -> tuple[int, dict[str, float]]:
        nonlocal lines_said
        step, figures, lines = ray.get(board.read.remote(lines_said), timeout=5)
        for line in lines:
            say(line)
        lines_said += len(lines)
        return step, figures

    def follow(progress) -> None:
        shown, started = None, time.monotonic()
        progress.set_postfix_str("starting workers")
        while not done.wait(1.0):
            try:
                step, figures = read()
            except Exception:  # noqa: BLE001 - the bar only
                continue
            if not step and shown is None and time.monotonic() - started > 180:
                # Workers that cannot be placed, or a slow start: Ray says which in the log.
                progress.set_postfix_str(f"no step yet, see {_log_path}" if _log_path else "no step yet")
            if step and shown is None:
                # Rates from the first step on: the workers' start (a minute on 2 cores) is not a step.
                # A resumed run's first report is the step it continues from.
                progress.n = progress.last_print_n = shown = step
                if not progress.disable:  # a disabled bar (--verbose) keeps no clock
                    progress.start_t = progress.last_print_t = progress._time()
                progress.set_postfix_str("", refresh=False)
            if figures:
                _show(progress, figures)
            if shown is not None and step > shown:
                progress.update(step - shown)
                shown = step

    with bar(description, total) as progress:
        thread = threading.Thread(target=follow, args=(progress,), daemon=True)
        thread.start()
        try:
            yield board
        finally:
            done.set()
            thread.join(timeout=7)
            try:  # the final figures, drawn before the bar closes; the bar only, never the run's error
                step, figures = read()
                if figures:
                    _show(progress, figures)
                progress.update(max(0, step - progress.n))
            except Exception:  # noqa: BLE001
                pass
            try:
                ray.kill(board)
            except Exception:  # noqa: BLE001
                pass
