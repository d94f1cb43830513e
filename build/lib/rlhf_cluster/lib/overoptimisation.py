"""Reward over-optimisation: the Gao et al. (2022) fit, and the rule that notices it during training.

Gao, Schulman & Hilton, "Scaling Laws for Reward Model Overoptimization": as a policy is pushed
against a proxy reward model, its gold (true) score first rises and then falls, as a function of
d = sqrt(KL(pi || pi_init)):

    gold(d) - gold(0) = d (alpha - beta d)

alpha is how fast optimising the proxy helps at first, beta how fast the proxy's errors take over;
the gold peaks at d* = alpha / (2 beta). A larger reward model over-optimises later (smaller beta).
"""

from __future__ import annotations

import math


def fit_gold_vs_sqrt_kl(kl: list[float], gain: list[float]) -> dict[str, float]:
    """Least-squares fit of gain = d (alpha - beta d), d = sqrt(kl), with no intercept (gain(0) = 0).

    The normal equations of the two features x1 = d, x2 = -d^2 are solved in closed form (2 x 2).
    R^2 = 1 - SS_res / SS_tot around the mean gain. Returns alpha, beta, r2, n and d_peak = alpha/(2 beta)
    (inf when beta <= 0: no turn-over in the measured range).
    """
    if len(kl) != len(gain) or len(kl) < 3:
        raise ValueError("fit_gold_vs_sqrt_kl needs as many gains as KLs, at least 3 points")
    if any(k < 0 for k in kl):
        raise ValueError(f"KL must be >= 0, got {min(kl)}")
    d = [math.sqrt(k) for k in kl]
    s11 = sum(x * x for x in d)
    s12 = -sum(x ** 3 for x in d)
    s22 = sum(x ** 4 for x in d)
    t1 = sum(x * y for x, y in zip(d, gain))
    t2 = -sum(x * x * y for x, y in zip(d, gain))
    det = s11 * s22 - s12 * s12
    if det <= 1e-12 * max(1.0, s11 * s22):
        raise ValueError("fit_gold_vs_sqrt_kl needs points at two or more distinct KLs > 0")
    alpha = (t1 * s22 - t2 * s12) / det
    beta = (s11 * t2 - s12 * t1) / det
    pred = [x * (alpha - beta * x) for x in d]
    mean = sum(gain) / len(gain)
    ss_res = sum((y - p) ** 2 for y, p in zip(gain, pred))
    ss_tot = sum((y - mean) ** 2 for y in gain)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    return {"alpha": alpha, "beta": beta, "r2": r2, "n": len(d),
            "d_peak": alpha / (2 * beta) if beta > 0 else math.inf}


def overoptimising(evals: list[tuple[float, float]], patience: int) -> bool:
    """True when the proxy is being climbed while the truth falls: over the last `patience` evaluations the
    proxy (reward-model) score rose and validation gold fell (the latest against the one `patience` back).

    `evals`: (proxy score, validation gold) per evaluation, oldest first. Only validation numbers go
    in: this rule stops runs, so it must never see the test split.
    """
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    if len(evals) <= patience:
        return False
    (proxy_then, gold_then), (proxy_now, gold_now) = evals[-1 - patience], evals[-1]
    return proxy_now > proxy_then and gold_now < gold_then
