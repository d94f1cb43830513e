"""Every job's command line goes through one scaffold: the same flags, the same error line and
the same exit codes for config, data and runtime errors (rlhf_cluster/scaffold.py)."""

from __future__ import annotations

import importlib

import pytest

from rlhf_cluster import scaffold
from rlhf_cluster.lib.config import CONFIG_DIR

# job module -> the function its main() hands the config to; "experiments" is the results harness's command line
JOBS = {"ppo": "run", "rejection_sampling": "run", "pipeline": "run", "sft": "run_sft", "reward": "run_reward",
        "dpo": "run_dpo", "evaluate": "run", "experiments": "run"}


def _job(name: str):
    return importlib.import_module("experiments.__main__" if name == "experiments" else f"rlhf_cluster.{name}")


def _exit(main, argv, capsys) -> tuple[int, str]:
    """(exit code, stderr) of main(argv); what it printed stays readable as `capsys.printed`."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    out = capsys.readouterr()
    capsys.printed = out.out
    return e.value.code, out.err


@pytest.mark.parametrize("name", sorted(JOBS))
def test_a_config_error_exits_2_naming_the_key(name, capsys, monkeypatch):
    job = _job(name)
    monkeypatch.setattr(job, JOBS[name], lambda cfg, **_: pytest.fail("a bad config reached the run"))
    code, err = _exit(job.main, ["bogus_key.sub=1"], capsys)
    assert code == scaffold.EXIT_BAD_INPUT == 2
    assert "bogus_key: unknown key" in err and err.startswith("error: ")


@pytest.mark.parametrize("name", sorted(JOBS))
def test_a_missing_config_file_exits_2(name, capsys, tmp_path):
    job = _job(name)
    code, err = _exit(job.main, ["--config", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and f"config file {tmp_path / 'nope.yaml'} does not exist" in err


@pytest.mark.parametrize("name", sorted(JOBS))
def test_a_failed_run_exits_1_and_other_errors_are_not_swallowed(name, capsys, monkeypatch):
    job = _job(name)

    def fails(cfg, **_):
        raise scaffold.RunFailed("gave up after 3 rollbacks")

    monkeypatch.setattr(job, JOBS[name], fails)
    code, err = _exit(job.main, [], capsys)
    assert code == scaffold.EXIT_RUN_FAILED == 1 and "error: gave up after 3 rollbacks" in err

    monkeypatch.setattr(job, JOBS[name], lambda cfg, **_: 1 / 0)
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback (and Python's exit code 1)
        job.main([])


def test_ppo_halts_are_run_failures():
    from rlhf_cluster.ppo import RunHalted

    assert issubclass(RunHalted, scaffold.RunFailed)


def test_job_flags_reach_the_run(monkeypatch):
    from rlhf_cluster import evaluate, ppo

    seen = {}
    monkeypatch.setattr(ppo, "run", lambda cfg, resume: seen.update(resume=resume, seed=cfg.seed))
    ppo.main(["--resume", "seed=7"])
    assert seen == {"resume": True, "seed": 7}
    monkeypatch.setattr(evaluate, "run", lambda cfg, **flags: seen.update(flags))
    evaluate.main(["--model", "m", "--samples", "2"])
    assert seen["model"] == "m" and seen["samples"] == 2 and seen["prompts"] is None


@pytest.mark.parametrize("name,model", [("sft", "base"), ("reward", "reward_base"), ("dpo", "base")])
def test_a_data_error_exits_2_before_ray_starts(name, model, builtin_assets, capsys, tmp_path):
    """A missing data file is named; the stage stops before it joins or starts Ray."""
    import ray

    job = importlib.import_module(f"rlhf_cluster.{name}")
    started = ray.is_initialized()
    missing = tmp_path / "missing.jsonl"
    code, err = _exit(job.main, ["--config", str(CONFIG_DIR / f"{name}-tiny.yaml"), f"output_dir={tmp_path / 'o'}",
                                 f"model.path={getattr(builtin_assets, model)}", f"data.train={missing}"], capsys)
    assert code == 2 and f"data file {missing} does not exist" in err
    assert ray.is_initialized() == started
    assert not (tmp_path / "o").exists()


def test_a_malformed_prompt_file_exits_2_before_any_actor_starts(builtin_assets, ray_cluster, capsys, tmp_path):
    """PPO reads its prompts before it starts an actor group; a file without the prompt field is named."""
    from rlhf_cluster import ppo

    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"text": "no messages here"}\n')
    code, err = _exit(ppo.main, ["--config", str(CONFIG_DIR / "smoke.yaml"), f"policy.path={builtin_assets.base}",
                                 f"reward.path={builtin_assets.reward_base}", f"output_dir={tmp_path / 'o'}",
                                 f"data.train={bad}"], capsys)
    assert code == 2 and str(bad) in err and "messages" in err
    assert "train prompts" not in capsys.printed and "starting actor groups" not in capsys.printed
    assert f"policy: {builtin_assets.base}" in capsys.printed  # it did get as far as the run


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_the_service_stops_within_10_s_of_ctrl_c_and_leaves_no_process(tmp_path):
    """`python -m rlhf_cluster.serve --apps checkpoints`, on a local cluster of its own: once it says it is serving,
    Ctrl-C (SIGINT). It exits within 10 s, and every process it started (Ray's daemons, the Serve controller, proxy
    and replicas) is gone by then."""
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time
    from pathlib import Path

    import psutil

    from rlhf_cluster.actors.group import free_port

    def alive(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env |= {"RLHF_SERVE_TOKEN": "t" * 32, "RLHF_CLUSTER_CACHE": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "rlhf_cluster.serve", "--apps", "checkpoints", "--port",
                             str(free_port()), "--num-cpus", "2"], cwd=Path(__file__).parent.parent, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while not any(x.startswith("serving on") for x in lines):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines[-40:])
            time.sleep(0.5)
        started = psutil.Process(proc.pid).children(recursive=True)
        assert any("raylet" in " ".join(p.cmdline()) for p in started), [p.name() for p in started]
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        proc.wait(10)
        left = [p for p in started if alive(p)]
        while left and time.monotonic() - t0 < 10:
            time.sleep(0.2)
            left = [p for p in left if alive(p)]
        took = time.monotonic() - t0
        assert proc.returncode == 0 and not left and took < 10, (took, [p.cmdline()[:3] for p in left],
                                                                 "".join(lines[-20:]))
        print(f"stopped in {took:.1f} s; {len(started)} processes it had started all gone")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
