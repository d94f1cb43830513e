"""The scaffold every job shares: its command line, its config, the Ray connection and exit codes.

    python -m rlhf_cluster.<job> [--config FILE] [job flags] [key.sub=value ...]

A job module holds `run(cfg, ...) -> summary` and `main(argv)`, which is `job.main(...)` with the
job's config class. Whatever the job, bad input exits EXIT_BAD_INPUT (2) with one line naming what is
wrong, before any actor starts; a run that started and could not finish exits EXIT_RUN_FAILED (1).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from rlhf_cluster.lib.config import ConfigError, JobConfig, check_resources, load_config, local_resources
from rlhf_cluster.lib.data import DataError

EXIT_RUN_FAILED = 1  # the run started and stopped short (halted by fault tolerance, gave up)
EXIT_BAD_INPUT = 2  # a config or data error (argparse uses 2 for bad arguments, too)


class RunFailed(RuntimeError):
    """A run that started and cannot finish; the job exits EXIT_RUN_FAILED with this message."""


def precheck(cfg: JobConfig) -> None:
    """Fail fast, before data is built or Ray starts, when a local cluster could not hold the job."""
    import ray

    if not ray.is_initialized() and not (cfg.ray.address or os.environ.get("RAY_ADDRESS")):
        check_resources(cfg, *local_resources(cfg))


def connect(cfg: JobConfig, log_to_driver: bool = True,
            check: Callable[[float, float], None] | None = None, log=print) -> tuple[float, float]:
    """Join the cluster of ray.address / RAY_ADDRESS (as under `ray job submit`, whose runtime env
    stays as the submitter set it), or start a local one; returns its (CPUs, GPUs). The job's groups
    are checked against the cluster (`check(cpus, gpus)`, default: `check_resources` of the config's
    groups), a local cluster before it starts. The models' dtypes are settled here (`precision`), and said."""
    import ray

    from rlhf_cluster.lib.precision import cpu_flags

    log(cfg.resolve_precision(cpu_flags()))

    check = check or (lambda cpus, gpus: check_resources(cfg, cpus, gpus))
    if not ray.is_initialized():
        address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=log_to_driver)
        else:
            check(*local_resources(cfg))  # before any process starts
            ray.init(num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus, include_dashboard=False,
                     log_to_driver=log_to_driver)
    res = ray.cluster_resources()
    cpus, gpus = res.get("CPU", 0.0), res.get("GPU", 0.0)
    check(cpus, gpus)
    return cpus, gpus


def main(name: str, config_cls: type[JobConfig], run: Callable, argv: list[str] | None,
         default_config: Path | None = None, description: str = "",
         add_flags: Callable[[argparse.ArgumentParser], None] | None = None, prog: str | None = None):
    """Parse the command line, load the typed config, call `run(cfg, **flags)` and map errors to exit codes.

    `add_flags` adds the job's own flags (e.g. PPO's --resume); their values reach `run` as keywords. `prog` is the
    command --help shows, for a program outside the package (python -m experiments).
    """
    from rlhf_cluster.lib.config import keys_help

    ap = argparse.ArgumentParser(prog=prog or f"python -m rlhf_cluster.{name}", description=description,
                                 epilog=keys_help(config_cls), formatter_class=argparse.RawDescriptionHelpFormatter)
    shown = f" (default: {default_config.name})" if default_config else "; keys not given take their defaults"
    ap.add_argument("--config", default=str(default_config) if default_config else None,
                    help=f"YAML config: a file, or a preset's name (smoke, tiny-cpu, ...: configs/){shown}")
    if add_flags:
        add_flags(ap)
    ap.add_argument("--print-config", action="store_true",
                    help="print the resolved config (file, overrides and defaults) as YAML and exit")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. trainer.zero_stage=2")
    args = vars(ap.parse_args(argv))
    path, overrides, print_config = args.pop("config"), args.pop("overrides"), args.pop("print_config")
    try:
        cfg = load_config(config_cls, path, overrides)
        if print_config:
            import yaml

            print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
            return cfg
        return run(cfg, **args)
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT) from None
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_RUN_FAILED) from None
