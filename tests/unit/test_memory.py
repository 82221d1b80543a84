import time

import torch

from rayloop.memory import PhasePeaks


def test_a_phase_that_allocates_shows_it_and_the_phase_around_it_does_not():
    peaks = PhasePeaks(interval_s=0.005)
    try:
        with peaks.phase("build"):
            pass
        with peaks.phase("save"):
            held = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
            time.sleep(0.1)  # 20 samples: the sampler sees it even where the process's lifetime peak was higher
            del held
        with peaks.phase("first_step"):
            pass
    finally:
        peaks.close()
    assert peaks.peaks["save"] - peaks.peaks["build"] >= 60 * 2**20
    assert peaks.peaks["first_step"] < peaks.peaks["save"] - 60 * 2**20  # freed: the next phase starts low again
