"""rlhf_cluster.lib.overoptimisation against numbers worked out by hand (no Ray: well under a second)."""

from __future__ import annotations

import math

import pytest

from rlhf_cluster.lib.overoptimisation import fit_gold_vs_sqrt_kl, overoptimising


def test_fit_recovers_an_exact_curve():
    # alpha 0.2, beta 0.05 at d = 1, 2, 3: gains 1(0.2-0.05)=0.15, 2(0.2-0.10)=0.20, 3(0.2-0.15)=0.15
    fit = fit_gold_vs_sqrt_kl([1.0, 4.0, 9.0], [0.15, 0.20, 0.15])
    assert fit["alpha"] == pytest.approx(0.2) and fit["beta"] == pytest.approx(0.05)
    assert fit["r2"] == pytest.approx(1.0) and fit["d_peak"] == pytest.approx(2.0) and fit["n"] == 3


def test_fit_by_hand_with_residuals():
    # d = 1, 2, 3; gains 0.1, 0.2, 0.1. Normal equations on x1 = d, x2 = -d^2:
    #   S11 = 14, S12 = -36, S22 = 98, T1 = 0.8, T2 = -1.8, det = 14*98 - 36^2 = 76
    #   alpha = (0.8*98 - 1.8*36)/76 = 13.6/76,  beta = (14*(-1.8) + 36*0.8)/76 = 3.6/76
    #   residuals -0.6/19, 0.6/19, -0.2/19 -> SS_res = 0.76/361; SS_tot = 0.02/3 -> R^2 = 13/19
    fit = fit_gold_vs_sqrt_kl([1.0, 4.0, 9.0], [0.1, 0.2, 0.1])
    assert fit["alpha"] == pytest.approx(13.6 / 76) and fit["beta"] == pytest.approx(3.6 / 76)
    assert fit["r2"] == pytest.approx(13 / 19)
    assert fit["d_peak"] == pytest.approx(13.6 / 7.2)


def test_fit_without_turn_over_and_bad_input():
    fit = fit_gold_vs_sqrt_kl([1.0, 4.0, 9.0], [0.1, 0.4, 0.9])  # gain = 0.1 d^2: still accelerating
    assert fit["alpha"] == pytest.approx(0.0, abs=1e-12) and fit["beta"] == pytest.approx(-0.1)
    assert math.isinf(fit["d_peak"])
    with pytest.raises(ValueError, match="at least 3"):
        fit_gold_vs_sqrt_kl([1.0, 2.0], [0.1, 0.2])
    with pytest.raises(ValueError, match="distinct"):
        fit_gold_vs_sqrt_kl([0.0, 0.0, 0.0], [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=">= 0"):
        fit_gold_vs_sqrt_kl([1.0, -1.0, 4.0], [0.0, 0.0, 0.0])


def test_overoptimising_needs_the_proxy_up_and_the_gold_down_over_patience_evaluations():
    # (proxy, validation gold) per evaluation: measured on a GRPO run with kl_coef 0 (the gold peaks at the 4th)
    run = [(0.0, 0.552), (0.925, 0.683), (1.576, 0.707), (1.966, 0.729), (1.613, 0.687)]
    assert not overoptimising(run[:4], patience=2)  # gold still rising
    # 5th against the 3rd: proxy 1.576 -> 1.613 up, gold 0.707 -> 0.687 down, and below the best 0.729
    assert overoptimising(run, patience=2)
    # against the 4th (patience 1): the proxy fell too (1.966 -> 1.613): a bad step, not over-optimisation
    assert not overoptimising(run, patience=1)
    assert not overoptimising(run, patience=4)  # against the 1st: gold 0.552 -> 0.687 is up
    assert not overoptimising(run[:2], patience=2)  # not enough evaluations yet
    # only the window's ends count: a dip inside it with both ends rising is no fall
    assert not overoptimising([(0.1, 0.70), (0.2, 0.60), (0.5, 0.75)], patience=2)
    assert overoptimising([(0.1, 0.70), (0.2, 0.80), (0.5, 0.65)], patience=2)
    assert not overoptimising([], patience=1)
    with pytest.raises(ValueError):
        overoptimising(run, patience=0)
