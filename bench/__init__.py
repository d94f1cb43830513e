"""Benchmarks of rlhf-cluster: `python -m bench.run` (see bench/README.md)."""
