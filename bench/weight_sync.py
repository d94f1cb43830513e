"""Benchmark `weight_sync`: on a private local Ray cluster, a ZeRO-3 `PolicyTrainer` group (2 ranks)
and one `RolloutEngine` group as PPO uses them; `export_weights` (gather + serialise) and
`update_weights` (load into the running vLLM worker) timed separately from the driver, after one
checksum-verified sync. Then the same across nodes (`ray.cluster_utils.Cluster` on this machine: each node
its own raylet and object store): the two trainer ranks on two nodes, the engine on a third, so the
ZeRO-3 gather crosses nodes and the buckets travel from rank 0's object store to the engine's.

Run through bench.run (`python -m bench.run --only weight_sync [--quick]`), which records the
machine, versions and load around it. Module-level imports stay light (stdlib only).
"""

from __future__ import annotations

import os
import time

from bench.common import builtin_assets, header, log, median


def sync_one_size(size: str, reps: int, bucket_bytes: int, pgs: tuple = (None, None)) -> dict:
    import ray
    from safetensors.torch import load

    from rlhf_cluster.actors.group import ActorGroup
    from rlhf_cluster.actors.rollout import RolloutEngine
    from rlhf_cluster.actors.trainer import PolicyTrainer
    from rlhf_cluster.lib.config import GroupResources, RolloutConfig, TrainerConfig

    assets = builtin_assets(size)
    trainer = TrainerConfig(num_ranks=2, num_cpus_per_rank=0.5, zero_stage=3)
    rollout = RolloutConfig()
    start: dict = {}
    t = time.perf_counter()
    policy = ActorGroup(PolicyTrainer, trainer, str(assets.base), trainer.model_dump(), 1000, name="bench-policy",
                        pg=pgs[0])
    start["policy_group_s"] = time.perf_counter() - t
    engine = None
    try:
        t = time.perf_counter()
        engine = ActorGroup(RolloutEngine, GroupResources(num_cpus_per_rank=0.5), str(assets.base),
                            rollout.model_dump(), name="bench-rollout", pg=pgs[1])
        start["rollout_group_s"] = time.perf_counter() - t
        actor = engine.actors[0]

        def export():
            return [ref for part in policy.run("export_weights", bucket_bytes) for ref in part]

        # warm-up sync (untimed), then check that it moved every tensor, and measure what moves
        t = time.perf_counter()
        buckets = export()
        loaded = ray.get(actor.update_weights.remote(buckets, 0))
        start["first_sync_s"] = time.perf_counter() - t
        blobs = ray.get(buckets)
        tensors = [tensor for blob in blobs for tensor in load(blob).values()]
        tensor_bytes = sum(x.numel() * x.element_size() for x in tensors)
        trainer_sums = policy.run("checksum")[0]
        engine_sums = ray.get(actor.checksum.remote())
        verified = trainer_sums.keys() == engine_sums.keys() and all(
            abs(trainer_sums[k][i] - engine_sums[k][i]) <= 1e-9 * max(1.0, abs(trainer_sums[k][i]))
            for k in trainer_sums for i in (0, 1))
        if loaded != len(tensors) or not verified:
            raise RuntimeError(f"weight sync check failed: loaded {loaded} of {len(tensors)} tensors, "
                               f"checksums equal: {verified}")
        info = {"parameters": sum(x.numel() for x in tensors), "tensors": len(tensors), "tensor_bytes": tensor_bytes,
                "serialized_bytes": sum(len(b) for b in blobs), "buckets": len(blobs),
                "nodes": {"policy": policy.nodes(), "rollout": engine.nodes()}}
        del blobs, tensors, buckets
        log(f"weight_sync/{size}: {info['parameters'] / 1e6:.2f} M parameters, {tensor_bytes / 1e6:.1f} MB in "
            f"{info['buckets']} bucket(s); started ({', '.join(f'{k} {v:.1f}' for k, v in start.items())}); "
            f"{reps} reps")

        export_s, update_s = [], []
        for rep in range(reps):
            t = time.perf_counter()
            buckets = export()
            export_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            ray.get(actor.update_weights.remote(buckets, rep + 1))
            update_s.append(time.perf_counter() - t)
            del buckets
            log(f"weight_sync/{size} rep {rep + 1}/{reps}: export {export_s[-1]:.3f} s, update {update_s[-1]:.3f} s")
    finally:
        if engine is not None:
            engine.shutdown()
        policy.shutdown()

    mb = info["tensor_bytes"] / 1e6
    med_e, med_u = median(export_s), median(update_s)
    total = [e + u for e, u in zip(export_s, update_s)]
    return {
        "model": size, "model_dir": str(assets.base), **info, "bucket_bytes": bucket_bytes, "repetitions": reps,
        "export_s": export_s, "update_s": update_s, "sync_s": total,
        "median_export_s": med_e, "median_update_s": med_u, "median_sync_s": median(total),
        "export_MB_per_s": mb / med_e, "update_MB_per_s": mb / med_u, "sync_MB_per_s": mb / median(total),
        "verified_checksums": verified, "startup": start,
    }


def across_nodes(config: dict) -> list[dict]:
    """The sizes again on a cluster of a head without CPUs, two trainer nodes and an engine node."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.placement_group import placement_group

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1, resources={"trainer_node": 1})
    cluster.add_node(num_cpus=1, resources={"engine_node": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": os.environ["VLLM_CPU_KVCACHE_SPACE"]}})
    try:
        out = []
        for size in config["sizes"]:
            pgs = (placement_group([{"CPU": 0.5, "trainer_node": 0.5}] * 2, strategy="STRICT_SPREAD"),
                   placement_group([{"CPU": 0.5, "engine_node": 0.5}]))
            r = sync_one_size(size, config["repetitions"][size], config["bucket_bytes"], pgs)
            for pg in pgs:
                ray.util.remove_placement_group(pg)
            if len(set(r["nodes"]["policy"])) != 2 or set(r["nodes"]["rollout"]) & set(r["nodes"]["policy"]):
                raise RuntimeError(f"the groups did not spread over three nodes: {r['nodes']}")
            out.append(r | {"layout": "3 nodes"})
        return out
    finally:
        ray.shutdown()
        cluster.shutdown()


def bench_weight_sync(quick: bool) -> tuple[dict, list[dict]]:
    import ray

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.pop("RAY_ADDRESS", None)  # always a private local cluster, never someone else's
    config = {"sizes": ["tiny"] if quick else ["tiny", "small"],
              "repetitions": {"tiny": 3} if quick else {"tiny": 7, "small": 5},
              "bucket_bytes": 64 << 20, "ray": "ray.init(address='local', num_cpus=4)", "dtype": "float32 (both sides)",
              "trainer": "PolicyTrainer ActorGroup, 2 ranks, ZeRO-3, num_cpus_per_rank 0.5, fp32, gloo",
              "rollout": "one RolloutEngine (vLLM, fp32) group, 1 rank, num_cpus_per_rank 0.5",
              "export": "policy.run('export_weights'): every rank gathers the ZeRO-3 partitions, rank 0 "
                        "serialises buckets with safetensors and ray.put()s them; timed from the driver",
              "update": "RolloutEngine.update_weights: ray.get the buckets, collective_rpc into vLLM's worker, "
                        "reload_weights in place, reset the prefix cache; timed from the driver",
              "layouts": {"1 node": "ray.init(address='local', num_cpus=4): every actor on one raylet",
                          "3 nodes": "ray.cluster_utils.Cluster on this machine: a head without CPUs, two trainer "
                                     "nodes (one rank each, STRICT_SPREAD) and an engine node, each its own raylet "
                                     "and object store; not in --quick"},
              "MB": "1e6 bytes of fp32 tensor data; MB/s = MB / median seconds",
              "warmup": "one untimed sync per size, checked: every tensor loaded and per-layer checksums equal",
              "env": {k: os.environ.get(k) for k in ("VLLM_CPU_KVCACHE_SPACE", "RLHF_TORCH_THREADS")}}
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"VLLM_CPU_KVCACHE_SPACE": os.environ["VLLM_CPU_KVCACHE_SPACE"]}})
    try:
        results = [sync_one_size(size, config["repetitions"][size], config["bucket_bytes"]) | {"layout": "1 node"}
                   for size in config["sizes"]]
    finally:
        ray.shutdown()
    if not quick:
        results += across_nodes(config)
    return config, results


# --------------------------------------------------------------------------- README section
def readme_table(rec: dict) -> list[str]:
    c = rec["config"]
    lines = [f"### weight_sync — ZeRO-3 trainer (2 ranks) → running vLLM engine (`{rec['_file']}`)", "",
             *header(rec),
             "Medians over the repetitions, after an untimed, checksum-verified sync; buckets of "
             f"{c['bucket_bytes'] >> 20} MiB; MB = 10⁶ bytes of fp32 weights; sync s is the median of the per-rep "
             "sums.", "",
             *[f"- *{name}*: {text}" for name, text in c.get("layouts", {}).items()], "",
             "| layout | model | parameters | MB | buckets | reps | export s (gather + serialise) | export MB/s "
             "| update s (load into vLLM) | update MB/s | sync s (export + update) | sync MB/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rec["results"]:
        lines.append(f"| {r.get('layout', '1 node')} | {r['model']} | {r['parameters'] / 1e6:.2f} M | "
                     f"{r['tensor_bytes'] / 1e6:.1f} | "
                     f"{r['buckets']} | {r['repetitions']} | {r['median_export_s']:.3f} | {r['export_MB_per_s']:.0f} | "
                     f"{r['median_update_s']:.3f} | {r['update_MB_per_s']:.0f} | {r['median_sync_s']:.3f} | "
                     f"{r['sync_MB_per_s']:.0f} |")
    return lines + [""]

