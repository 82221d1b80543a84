"""A job's terminal: its own lines and bars; the output of the libraries under it in the run's log file."""

import subprocess
import sys
import textwrap
from pathlib import Path

from rayloop.config import root_cause
from rayloop.console import ProgressBoard, StepReporter

JOB = textwrap.dedent("""
    import logging, os, subprocess, sys
    from rayloop.config import JobConfig, run_cli
    from rayloop.console import bar, say

    class Noisy(JobConfig):
        job_name = "noisy"
        fail: bool = False

    def main(cfg):
        print("library chatter on stdout")
        logging.getLogger("vllm").warning("library warning through logging")
        os.write(2, b"C++ chatter on fd 2\\n")
        subprocess.run(["echo", "a child process's chatter"], check=True)
        with bar("stage", 3) as progress:
            progress.update(3)
        say("noisy: the result, 42")
        if cfg.fail:
            raise RuntimeError("the engine died\\nsecond line of the message")

    run_cli(Noisy, main)
""")


def run_job(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    script = tmp_path / "noisy.py"
    script.write_text(JOB)
    return subprocess.run([sys.executable, str(script), f"--storage.path={tmp_path / 'runs'}", *args],
                          capture_output=True, text=True, timeout=60)


def test_library_output_goes_to_the_runs_log_and_the_terminal_keeps_the_jobs_lines(tmp_path):
    done = run_job(tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[1:] == ["noisy: the result, 42"], done.stdout
    logs = list((tmp_path / "runs" / "noisy" / "logs").glob("noisy-*.log"))
    assert len(logs) == 1 and str(logs[0]) in lines[0], lines[0]
    assert "chatter" not in done.stdout + done.stderr and "warning" not in done.stdout + done.stderr
    assert "3/3" in done.stderr  # the stage's bar, on the terminal
    log = logs[0].read_text()
    for text in ("library chatter on stdout", "library warning through logging", "C++ chatter on fd 2",
                 "a child process's chatter", "noisy: the result, 42"):
        assert text in log, text


def test_verbose_leaves_everything_on_the_terminal(tmp_path):
    done = run_job(tmp_path, "--verbose")
    assert done.returncode == 0, done.stderr
    assert "library chatter on stdout" in done.stdout and "C++ chatter on fd 2" in done.stderr
    assert not (tmp_path / "runs" / "noisy" / "logs").exists()


def test_a_crash_is_one_line_on_the_terminal_and_its_traceback_in_the_log(tmp_path):
    done = run_job(tmp_path, "--fail=true")
    errors = done.stderr.strip().splitlines()[-1:]
    log = next((tmp_path / "runs" / "noisy" / "logs").glob("noisy-*.log"))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert errors == [f"error: RuntimeError: the engine died (traceback in {log})"], done.stderr
    assert "Traceback" in log.read_text() and "second line of the message" in log.read_text()


class Board:
    """Stands in for the driver's ProgressBoard actor: records what a rank sends."""

    def __init__(self):
        self.sent = []
        self.update = self

    def remote(self, step, figures):
        self.sent.append((step, figures))


def test_the_step_reporter_sends_at_most_twice_a_second_and_always_the_last_step():
    board = Board()
    reporter = StepReporter(board, total=100)
    for step in range(1, 101):
        reporter.update(step, loss=1.0 / step)
    assert board.sent[0][0] == 1 and board.sent[-1] == (100, {"loss": 0.01}), board.sent
    assert len(board.sent) < 10, board.sent
    StepReporter(None, total=3).update(3, loss=1.0)  # no board: nothing to send, nothing raised


def test_the_error_line_names_the_workers_error_not_ray_trains_wrapper():
    from ray.train.v2.api.exceptions import ControllerError, WorkerGroupError

    failed = WorkerGroupError("Training failed due to worker errors:\n", {1: ValueError("rank 1"),
                                                                          0: KeyError("no column 'answer'")})
    assert repr(root_cause(failed)) == repr(KeyError("no column 'answer'"))
    assert repr(root_cause(ControllerError(RuntimeError("placement")))) == repr(RuntimeError("placement"))
    plain = OSError("disk full")
    assert root_cause(plain) is plain


def test_a_ranks_line_for_the_user_reaches_the_board_once():
    board = ProgressBoard()

    class Remote:  # the actor handle's `.post.remote(line)`, called in this process
        post = type("Post", (), {"remote": staticmethod(board.post)})

    StepReporter(Remote(), total=10).say("pretrain: training in fp32")
    StepReporter(None, total=10).say("a rank other than 0: nothing sent")
    assert board.read(0)[2] == ["pretrain: training in fp32"] and board.read(1)[2] == []
