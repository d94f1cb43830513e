"""Numbers read off results: means and spreads over seeds, the over-optimisation fit, and which verifiable variant
validation chooses. Pure functions of the results JSON, so the report can be regenerated from it alone."""

from __future__ import annotations

import statistics

# every metric the evaluator reports per seed, aggregated over seeds
METRICS = ("test_gold", "test_gold_se", "helpfulness", "safety", "kl", "length", "rm_score", "val_gold",
           "sampled_gold", "seconds")


def aggregate(per_seed: dict[str, dict]) -> dict:
    """Mean and sample standard deviation (0 with one seed) of each metric over seeds."""
    out = {}
    for key in METRICS + ("oracle_gold",):
        xs = [r[key] for r in per_seed.values() if key in r]
        if xs:
            out[key] = {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}
    return out


def overoptimisation_fit(runs: list[dict]) -> dict | None:
    """Fit gain = d (alpha - beta d) over every evaluation of every run; gains relative to each run's start."""
    from rlhf_cluster.lib.overoptimisation import fit_gold_vs_sqrt_kl

    kl, gain = [], []
    for run in runs:
        start = run["points"][0]["gold"]
        for p in run["points"]:
            kl.append(p["kl"])
            gain.append(p["gold"] - start)
    try:
        return fit_gold_vs_sqrt_kl(kl, gain)
    except ValueError:  # too few points or no KL spread (a --quick run)
        return None


def preset_choice(results: dict) -> dict | None:
    """Which variant configs/verifiable-grpo.yaml should be: of those run over every seed, the one with the
    highest mean validation pass@1 at the runs' end. Validation only; None while a run lacks it."""
    every = results["config"]["verifiable"].get("every_seed", ["grpo"])
    runs = [r for r in results["runs"] if r["variant"] in every]
    if not runs or any(r["final"].get("val_pass@1") is None for r in runs):
        return None
    finals = {name: [r["final"]["val_pass@1"] for r in runs if r["variant"] == name]
              for name in dict.fromkeys(r["variant"] for r in runs)}
    means = {name: statistics.fmean(xs) for name, xs in finals.items()}
    spread = {name: statistics.stdev(xs) if len(xs) > 1 else 0.0 for name, xs in finals.items()}
    return {"val_pass@1": means, "std": spread, "chosen": max(means, key=means.get)}


def verifiable_aggregate(runs: list[dict]) -> dict:
    """Mean and std over seeds of a variant's final (and initial) test figures."""
    def ms(xs):
        xs = [x for x in xs if x is not None]
        return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0} if xs else None

    k = runs[0]["k"]
    return {"seeds": [r["seed"] for r in runs], "k": k,
            "pass@1_initial": ms([r["initial"]["pass@1"] for r in runs]),
            "pass@1": ms([r["final"]["pass@1"] for r in runs]),
            f"pass@{k}_initial": ms([r["initial"][f"pass@{k}"] for r in runs]),
            f"pass@{k}": ms([r["final"][f"pass@{k}"] for r in runs]),
            "accuracy": ms([r["final"]["accuracy"] for r in runs]), "kl": ms([r["final"]["kl"] for r in runs]),
            "length": ms([r["final"]["length"] for r in runs]),
            "filtered_frac": ms([r["filtered_frac"] for r in runs]), "seconds": ms([r["seconds"] for r in runs]),
            "gain": ms([r["final"]["pass@1"] - r["initial"]["pass@1"] for r in runs])}
