"""PPO on a Ray cluster of several nodes: a head without CPUs and two worker nodes (tests/multinode_cluster.py:
ray.cluster_utils.Cluster, each node its own raylet and object store, on this one machine, sharing its disk and
address). The policy trainer's two ZeRO-3 ranks and a partitioned reference's two ranks are each spread over both
nodes (STRICT_SPREAD), so their process groups and the weight sync cross nodes; the coordinator is a driver on the
head. The job stops after iteration 1 and a second run resumes from its checkpoint. Checkpoints go to a storage URI
(`checkpoint_storage`, file:// here; s3:// and the like on a real cluster): each trainer rank stages its files on
its own node (a directory per node) and uploads them, and the resume runs from a new output directory, so neither
the coordinator nor any rank reads a file that only another node wrote to its disk."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_cluster.lib.config import CONFIG_DIR

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.slow, pytest.mark.long]

REPO = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def cluster(nodes: int, cpus_per_node: float, staging: Path):
    """The address of a fresh multi-node cluster, stopped (only it) at the end."""
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "multinode_cluster.py"), str(nodes),
                             str(cpus_per_node), str(staging)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, cwd=REPO, start_new_session=True)
    try:
        address = proc.stdout.readline().strip()
        assert address, "the multi-node cluster did not start"
        yield address
    finally:
        proc.stdin.close()  # the helper shuts its cluster down
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.timeout(900)
def test_ppo_runs_and_resumes_across_nodes(builtin_assets, tmp_path):
    out, store = tmp_path / "ppo", f"file://{tmp_path / 'storage'}"
    job = [sys.executable, "-m", "rlhf_cluster.ppo", "--config", str(CONFIG_DIR / "smoke.yaml"),
           f"registry={out / 'registry'}", f"policy.path={builtin_assets.base}", f"checkpoint_storage={store}",
           f"reward.path={builtin_assets.reward_base}", f"builtin.cache_dir={builtin_assets.root.parent}",
           "estimator=grpo", "ptx_coef=0", "iterations=2", "eval_every=2", "checkpoint_every=1",
           "trainer.placement=STRICT_SPREAD", "reference.num_ranks=2", "reference.partition=true",
           "reference.placement=STRICT_SPREAD"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)
    staging = tmp_path / "node-disks"
    with cluster(2, 2, staging) as address:
        first = subprocess.run([*job, f"output_dir={out}", f"ray.address={address}", "stop_after_iterations=1"],
                               cwd=REPO, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               timeout=600)
        assert first.returncode == 0, first.stdout[-5000:]
        spread = next(line for line in first.stdout.splitlines() if line.startswith("ranks on nodes:"))
        assert "policy 2 on 2" in spread and "reference 2 on 2" in spread and "(the cluster has 3 nodes)" in spread
        # the resume starts from another output directory: all it needs is in the storage
        resumed = tmp_path / "ppo-resumed"
        second = subprocess.run([*job, f"output_dir={resumed}", f"ray.address={address}", "--resume"], cwd=REPO,
                                env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=600)
        assert second.returncode == 0, second.stdout[-5000:]
    print(spread)
    assert any("resumed from" in line and "storage/iter_000001" in line for line in second.stdout.splitlines()), \
        second.stdout[-3000:]
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]  # no gap, no duplicate
    # the engine samples with the weights synced across nodes: its log-probs are the trainer's
    assert all(r["rollout/logprob_gap"] < 1e-4 for r in rows[1:]), [r["rollout/logprob_gap"] for r in rows]
    saved = tmp_path / "storage" / "iter_000002"
    manifest = json.loads((saved / "manifest.json").read_text())
    # both trainer ranks uploaded their own ZeRO-3 partition, rank 0 the HF export; nothing under the output dirs
    shards = {f"policy/state/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)}
    assert shards | {"hf/model.safetensors", "coordinator.json"} <= set(manifest), sorted(manifest)
    assert not (out / "checkpoints").exists() and not (resumed / "checkpoints").exists()
    # each node staged on its own directory, and left nothing behind
    assert sorted(p.name for p in staging.iterdir()) == ["node0", "node1"]
    assert not any(staging.rglob("*.pt")), sorted(staging.rglob("*"))
