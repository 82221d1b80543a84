"""Peak host memory of a training worker, per phase of its run: building the model, wrapping it in its DeepSpeed
engine, loading its data, resuming, the first step, steady state, saving.

Out-of-memory is where large runs fail, and the phase names the culprit: a build that holds the whole model, a
save that gathers it, a data loader that grows with the corpus. Each worker samples its own resident set size on a
daemon thread; a phase's peak is the largest sample taken while it was open, or the process's lifetime peak
(`ru_maxrss`, exact) where that rose during the phase.
"""

from __future__ import annotations

import contextlib
import os
import resource
import threading

PHASES = ("build", "engine", "data", "resume", "first_step", "steady", "save")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class PhasePeaks:
    """`with peaks.phase("save"): ...`; outside any `phase` block samples count towards `steady`.

    `interval_s` bounds what a sample can miss of a short spike that does not set a new lifetime peak.
    """

    def __init__(self, interval_s: float = 0.02):
        self.peaks: dict[str, int] = {}
        self.entry: dict[str, int] = {}
        """Resident bytes when each phase was first entered: what the process held before it."""
        self._current = "steady"
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._interval_s = interval_s
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True, name="rayloop-rss")
        self._thread.start()

    def _record(self, phase: str, value: int) -> None:
        with self._lock:
            if value > self.peaks.get(phase, 0):
                self.peaks[phase] = value

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._record(self._current, _rss_bytes())

    @contextlib.contextmanager
    def phase(self, name: str):
        outer, lifetime, entry = self._current, _max_rss_bytes(), _rss_bytes()
        self.entry.setdefault(name, entry)
        self._current = name
        self._record(name, entry)
        try:
            yield
        finally:
            self._record(name, _rss_bytes())
            if (after := _max_rss_bytes()) > lifetime:
                self._record(name, after)
            self._current = outer

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def peaks_of_all_workers(peaks: PhasePeaks) -> dict[str, list[int]]:
    """Every rank's peak per phase, by rank, and (`<phase>_entry`) what it held when the phase began; a collective:
    every rank calls it. Phases a rank never entered are 0."""
    import torch.distributed as dist

    mine = dict(peaks.peaks) | {f"{phase}_entry": value for phase, value in peaks.entry.items()}
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    keys = [key for phase in PHASES for key in (phase, f"{phase}_entry")]
    return {key: [ranks.get(key, 0) for ranks in gathered] for key in keys if any(key in ranks for ranks in gathered)}

