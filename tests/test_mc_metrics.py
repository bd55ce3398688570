"""MC1/MC2/MC3 against values computed by hand."""

import math

import pytest

from vllm_steer.eval.mc_metrics import mc1, mc2, mc3


def test_mc_metrics_on_hand_computed_items():
    # item 1: true answers score -1 and -2, false ones -1.5 and -3
    e = math.exp
    assert mc2([-1.0, -2.0], [-1.5, -3.0]) == pytest.approx(
        (e(-1) + e(-2)) / (e(-1) + e(-2) + e(-1.5) + e(-3)))
    # by hand: (0.367879 + 0.135335) / (0.367879 + 0.135335 + 0.223130 + 0.049787) = 0.503214 / 0.776131
    assert mc2([-1.0, -2.0], [-1.5, -3.0]) == pytest.approx(0.648362, abs=1e-6)
    assert mc3([-1.0, -2.0], [-1.5, -3.0]) == 0.5  # only -1 beats the best false (-1.5)
    assert mc1(-1.0, [-1.5, -3.0]) == 1.0
    # item 2: the best false answer wins
    assert mc1(-4.0, [-3.9, -10.0]) == 0.0
    assert mc3([-4.0, -5.0], [-3.9]) == 0.0
    assert mc2([-4.0], [-4.0]) == pytest.approx(0.5)
    # ties are not wins
    assert mc1(-2.0, [-2.0]) == 0.0 and mc3([-2.0], [-2.0]) == 0.0
    # very negative scores (long answers) stay finite: log-sum-exp, not exp
    assert mc2([-1000.0], [-1001.0]) == pytest.approx(1 / (1 + e(-1)))


def test_mc_metrics_refuse_empty_sides():
    with pytest.raises(ValueError):
        mc1(-1.0, [])
    with pytest.raises(ValueError):
        mc2([], [-1.0])
    with pytest.raises(ValueError):
        mc3([-1.0], [])
