"""RecordingComposite: hands every solve to its callback and answers exactly as its child."""

from __future__ import annotations

import numpy as np
import pytest

from solvers import get_solver
from solvers.composites import RecordingComposite
from tests.solvers.conftest import random_instance


def test_composites_recording_sees_every_call_and_answers_as_child():
    seen = []
    recorder = RecordingComposite(get_solver("swap-descent"), lambda *call: seen.append(call))
    problems = [random_instance(seed) for seed in (0, 2)]
    start = np.zeros(problems[1].n, dtype=np.int8)
    start[: problems[1].ks[0]] = 1
    answers = [recorder.solve(problems[0], seed=3), recorder.solve(problems[1], initial_state=start, seed=3)]
    assert [call[0] for call in seen] == [0, 1]
    assert seen[0][1] is problems[0] and seen[0][2] is None
    np.testing.assert_array_equal(seen[1][2], start)
    child = get_solver("swap-descent").solve(problems[1], initial_state=start, seed=3)
    np.testing.assert_array_equal(answers[1].x, child.x)
    assert answers[1].energy == child.energy == seen[1][3].energy
    assert recorder.name == "swap-descent" and answers[0].info["solver"] == "swap-descent"


def test_composites_recording_rejects_bad_arguments():
    with pytest.raises(TypeError, match="'child' should be a Solver"):
        RecordingComposite("anneal", print)
    with pytest.raises(TypeError, match="'record' should be callable"):
        RecordingComposite(get_solver("swap-descent"), None)
