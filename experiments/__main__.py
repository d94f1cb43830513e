"""The results harness: every method on the built-in task at one sample budget, over seeds, one evaluator.

    python -m experiments                    # the recorded run -> docs/results.md, README figures (make results)
    python -m experiments --quick            # one seed, small budgets: a check that everything runs
    python -m experiments --report-only      # docs/results.md and README figures from the committed JSON
    python -m experiments suite=verifiable   # GRPO and its stabilisers on the arithmetic task
                                             # -> docs/results-verifiable.md (make results-verifiable)

The keys are ResultsConfig's (rlhf_cluster/lib/config/results.py); --help lists them.
"""

from __future__ import annotations

import json
import sys

from experiments import methods, verifiable
from experiments.report import DOCS, RECORDED, RECORDED_VERIFIABLE, write_report, write_verifiable_report
from rlhf_cluster import scaffold
from rlhf_cluster.lib.config import ResultsConfig

QUICK = ["seeds=[0]", "samples_per_method=128", "best_of_k=4", "eval_points=1", "overoptimisation.kl_coefs=[0.0]",
         "overoptimisation.iterations=6", "overoptimisation.eval_every=2", "overoptimisation.reward_sizes=[tiny]",
         "verifiable.iterations=4", "verifiable.eval_every=2"]


def run(cfg: ResultsConfig, quick: bool = False, report_only: bool = False, log=print) -> dict:
    """The suite `cfg.suite` names, or (--report-only) the committed pages regenerated from the committed JSON."""
    if report_only:
        results = json.loads(RECORDED.read_text())
        write_report(results)
        log(f"regenerated {DOCS / 'results.md'} and README's results block from {RECORDED}")
        if RECORDED_VERIFIABLE.exists():
            write_verifiable_report(json.loads(RECORDED_VERIFIABLE.read_text()))
            log(f"regenerated {DOCS / 'results-verifiable.md'} from {RECORDED_VERIFIABLE}")
        return results
    if cfg.suite == "verifiable":
        return verifiable.run(cfg, quick, log)
    return methods.run(cfg, quick, log)


def main(argv: list[str] | None = None) -> dict:
    def flags(ap):
        ap.add_argument("--quick", action="store_true", help="one seed and small budgets (a check that all runs)")
        ap.add_argument("--report-only", action="store_true",
                        help="regenerate docs/results.md and README's block from docs/results/results.json")

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--quick" in argv:  # the quick budgets go first, so the command line can still override them
        argv = [a for a in argv if a != "--quick"] + ["--quick"]
        argv = _with_overrides(argv, QUICK)
    return scaffold.main("results", ResultsConfig, run, argv, None, __doc__.split("\n")[0], flags,
                         prog="python -m experiments")


def _with_overrides(argv: list[str], defaults: list[str]) -> list[str]:
    """`defaults` (key=value) placed before the user's own overrides, so that the user's win."""
    flags = [a for a in argv if a.startswith("-") or "=" not in a]
    overrides = [a for a in argv if a not in flags]
    given = {o.split("=", 1)[0] for o in overrides}
    return flags + [d for d in defaults if d.split("=", 1)[0] not in given] + overrides


if __name__ == "__main__":
    main()
