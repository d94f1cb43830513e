"""The experiments behind docs/results.md, README's results block and docs/results-verifiable.md: every method
on the built-in task over seeds, and GRPO's stabilisers on the verifiable one. They drive the package's jobs and
write the repository's pages, so they live in the checkout beside bench/, outside the wheel.

    evaluator.py   one vLLM evaluator that scores every method's output
    methods.py     the methods suite: each method's job (Harness), the over-optimisation sweep, the suite's run
    verifiable.py  the verifiable suite, with its resume
    stats.py       aggregates over seeds, the over-optimisation fit, the preset validation chooses
    report.py      the pages, README's block and the figures, from a results JSON alone; the targets they print
    __main__.py    the command line: python -m experiments
"""
