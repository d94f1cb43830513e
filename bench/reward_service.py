"""Benchmark `reward_service`: the reward app (rlhf_cluster/serve/reward_app.py) on a private local Ray Serve,
loaded over real HTTP on loopback by 1, 8 and 64 concurrent clients sending one item per request (and
8 clients sending 32), batched vs unbatched, against the same model's raw batched forward throughput
in-process (the limit). Also records the CPU time the Serve proxy, the replica, the rest of Ray and the
clients spend per item: where the time goes.

Run through bench.run (`python -m bench.run --only reward_service [--quick]`), which records the
machine, versions and load around it. Module-level imports stay light (stdlib only).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import tempfile
import time
from pathlib import Path

from bench.common import builtin_assets, header, log, median, percentile, read_jsonl

# The two modes, switched on the running replica through `reconfigure(user_config)` (no restart):
# unbatched = every request's item is its own forward pass; batched = @serve.batch collects items of
# concurrent requests for up to `batch_wait_timeout_s` or `max_batch_size` items.
MODES = {"unbatched": {"max_batch_size": 1, "batch_wait_timeout_s": 0.0},
         "batched": {"max_batch_size": 64, "batch_wait_timeout_s": 0.005}}
# (concurrent clients, items per request): the issue's levels with one item per request (all batching
# has to come from concurrent requests), and one case of large requests as a PPO scorer sends them
CASES = [(1, 1), (8, 1), (64, 1), (8, 32)]
TARGET_CASE = (64, 1)  # where the issue's targets are checked
POOL = 128  # distinct (prompt, response) items from the built-in held-out preferences, sent round-robin
TARGETS = {"batched_over_limit": 0.8, "batched_over_unbatched": 5.0}
# Serve's request paths: `env` is set before Ray starts (the controller, proxy and replica read it), `args` are the
# reward app's args, `clients` says where the clients connect. As shipped; Serve's throughput-optimised settings
# (RAY_SERVE_THROUGHPUT_OPTIMIZED: user code on the replica's event loop instead of a thread, buffered request logs,
# gRPC between proxy and replica, direct ingress, GC frozen after start); the app's access log off; and clients on
# the replica's own HTTP port (direct ingress: no proxy hop), with the access log off too.
PATHS = {
    "default": {"env": {}, "args": {}, "clients": "proxy"},
    "throughput_optimized": {"env": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}, "args": {}, "clients": "proxy"},
    "access_log_off": {"env": {}, "args": {"access_log": False}, "clients": "proxy"},
    "direct_ingress": {"env": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}, "args": {"access_log": False},
                       "clients": "replica"},
}
DIRECT_INGRESS_PORTS = range(30000, 31000)  # Serve's default RAY_SERVE_DIRECT_INGRESS_{MIN,MAX}_HTTP_PORT


def _replica_port(replica_id: str) -> int:
    """The HTTP port the reward replica `replica_id` listens on under direct ingress: Serve allocates it from
    DIRECT_INGRESS_PORTS and logs it; asking each open port in the range for /healthz finds it."""
    import socket

    import httpx

    for port in DIRECT_INGRESS_PORTS:
        with socket.socket() as sock:
            sock.settimeout(0.05)
            if sock.connect_ex(("127.0.0.1", port)) != 0:
                continue
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).json().get("replica") == replica_id:
                return port
        except (httpx.HTTPError, ValueError):
            continue
    raise RuntimeError(f"no direct-ingress HTTP port answers for replica {replica_id} in {DIRECT_INGRESS_PORTS}")


def _items(assets, n: int) -> list[dict]:
    """(prompt, response) pairs of the built-in task: chosen and rejected answers to held-out prompts."""
    out = []
    for row in read_jsonl(assets.file("preferences_test.jsonl")):
        prompt = row["prompt"][-1]["content"]
        for side in ("chosen", "rejected"):
            out.append({"prompt": prompt, "response": row[side][-1]["content"]})
        if len(out) >= n:
            break
    if len(out) < n:
        raise RuntimeError(f"the built-in task has {len(out)} held-out preference items, the benchmark needs {n}")
    return out[:n]


def _model_dir(size: str) -> tuple[Path, str, object]:
    """The trained built-in reward model (what PPO scores with) when it exists, else the untrained reward_base."""
    from rlhf_cluster.lib.builtin import cache_root
    from rlhf_cluster.lib.config import BuiltinConfig

    assets = builtin_assets(size)
    trained = cache_root(BuiltinConfig(size=size)) / "reward" / "model"
    if (trained / "config.json").exists():
        return trained, "trained built-in reward model", assets
    return assets.reward_base, "untrained reward_base", assets


class _CpuMeter:
    """CPU seconds (user + system) between start() and stop() of the Serve proxy, the reward replica, the
    rest of this benchmark's Ray cluster (GCS, raylet, controller, idle workers: `ray_rest`), this process
    (the HTTP clients and the Ray driver) and the whole machine; `other_cpu_s` is everyone else's work.
    Only this process's descendants are looked at: other users' Ray clusters on the machine run the
    same actor names."""

    NAMES = {"proxy": "ray::ProxyActor", "replica": "ray::ServeReplica:reward:"}

    def __init__(self):
        import psutil

        me = psutil.Process()
        self.procs: dict = {"clients": [me]}
        for p in me.children(recursive=True):
            try:
                cmd = " ".join(p.cmdline())
            except (psutil.Error, OSError):
                continue
            key = next((k for k, pattern in self.NAMES.items() if cmd.startswith(pattern)), "ray_rest")
            self.procs.setdefault(key, []).append(p)
        self.cores = psutil.cpu_count() or 1

    def _read(self) -> tuple[dict, float, float]:
        import psutil

        own = {}
        for key, procs in self.procs.items():
            own[key] = 0.0
            for p in procs:
                try:
                    t = p.cpu_times()
                    own[key] += t.user + t.system
                except (psutil.Error, OSError):  # a process that ended: its time is lost
                    pass
        m = psutil.cpu_times()
        busy = m.user + m.system + m.nice + getattr(m, "irq", 0) + getattr(m, "softirq", 0) + getattr(m, "steal", 0)
        return own, busy, time.perf_counter()

    def start(self):
        self._start = self._read()

    def stop(self) -> dict:
        own1, busy1, t1 = self._read()
        own0, busy0, t0 = self._start
        wall = t1 - t0
        cpu = {k: round(own1[k] - own0[k], 3) for k in own1}
        machine_busy = busy1 - busy0
        return {"cpu_s": cpu, "machine_busy_cpu_s": round(machine_busy, 3),
                "other_cpu_s": round(machine_busy - sum(cpu.values()), 3),
                "machine_capacity_cpu_s": round(wall * self.cores, 3)}


async def _round(base: str, bodies: list[bytes], items_per_request: int, clients: int, per_client: int) -> dict:
    """`clients` concurrent HTTP clients (one keep-alive connection each) send `per_client` POST /v1/score
    requests of `items_per_request` items each, back to back; timed from a common start after one untimed
    request each."""
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    ready, go = asyncio.Event(), asyncio.Event()
    n_ready = 0
    headers = {"Content-Type": "application/json"}

    async def one(c, body: bytes, record: bool):
        t = time.perf_counter()
        try:
            r = await c.post("/v1/score", content=body, headers=headers)
            dt = time.perf_counter() - t
            if r.status_code != 200:
                errors.append(f"HTTP {r.status_code}: {r.text[:200]}")
                return
            scores = r.json().get("scores")
            if not (isinstance(scores, list) and len(scores) == items_per_request
                    and all(isinstance(x, float) and math.isfinite(x) for x in scores)):
                errors.append(f"bad body: {r.text[:200]}")
                return
            if record:
                latencies.append(dt)
        except Exception as e:  # counted and reported, never hidden
            errors.append(f"{type(e).__name__}: {e}"[:300])

    async def client(k: int):
        nonlocal n_ready
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as c:
            try:
                await one(c, bodies[k % len(bodies)], record=False)  # connect + warm; untimed
            finally:
                n_ready += 1
                if n_ready == clients:
                    ready.set()
            await go.wait()
            for j in range(per_client):
                await one(c, bodies[(k + j * clients) % len(bodies)], record=True)

    tasks = [asyncio.create_task(client(k)) for k in range(clients)]
    await ready.wait()
    meter = _CpuMeter()
    warm_errors = len(errors)
    meter.start()
    t0 = time.perf_counter()
    go.set()
    await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    cpu = meter.stop()
    return {"wall_s": wall, "latencies_s": latencies, "errors": errors[warm_errors:],
            "warmup_errors": errors[:warm_errors], **cpu}


def _health(client) -> dict:
    return client.get("/healthz").json()["batching"]


def _limit(rm, encoded: list[list[int]], batch_sizes: list[int], seconds: float, threads: int) -> dict:
    """Raw forward throughput (items/s) of rlhf_cluster.serve.reward_model.forward in this process with `threads` torch
    threads, same items in the same order, for each batch size: as many batches as fit in about `seconds`
    (at least 3) after one untimed batch."""
    import torch

    from rlhf_cluster.serve.reward_model import forward

    out, before = {}, torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = _limit_loop(forward, rm, encoded, batch_sizes, seconds)
    finally:
        torch.set_num_threads(before)
    return out


def _limit_loop(forward, rm, encoded, batch_sizes, seconds) -> dict:
    out = {}
    for bs in batch_sizes:
        batches = [[encoded[(i * bs + j) % len(encoded)] for j in range(bs)] for i in range(len(encoded))]
        forward(rm, batches[0])  # warm
        n, t0 = 0, time.perf_counter()
        while n < 3 or time.perf_counter() - t0 < seconds:
            forward(rm, batches[n % len(batches)])
            n += 1
        out[bs] = n * bs / (time.perf_counter() - t0)
    return out


def _summarise(rounds: list[dict], clients: int, items_per_request: int, per_client: int) -> dict:
    lat = [x for r in rounds for x in r["latencies_s"]]
    errors = [e for r in rounds for e in r["errors"]]
    warm_errors = [e for r in rounds for e in r["warmup_errors"]]
    items_per_round = clients * per_client * items_per_request
    tput = [items_per_round / r["wall_s"] for r in rounds]
    items = len(lat) * items_per_request  # successfully scored, timed items
    cpu = {k: sum(r["cpu_s"][k] for r in rounds) for k in rounds[0]["cpu_s"]}
    batches = sum(r["batches"] for r in rounds)
    batched_items = items + clients * items_per_request * len(rounds)  # + the warm-up requests' items
    busy = sum(r["machine_busy_cpu_s"] for r in rounds)
    return {
        "clients": clients, "items_per_request": items_per_request, "requests_per_client": per_client,
        "rounds": len(rounds), "requests": clients * per_client * len(rounds), "ok": len(lat),
        "errors": len(errors), "error_samples": errors[:5],
        "warmup_requests": clients * len(rounds), "warmup_errors": len(warm_errors),
        "latency_ms": {"p50": 1e3 * percentile(lat, 50), "p99": 1e3 * percentile(lat, 99),
                       "mean": 1e3 * sum(lat) / len(lat), "max": 1e3 * max(lat)} if lat else None,
        "items_per_s": tput, "median_items_per_s": median(tput),
        "batches": batches, "mean_batch": batched_items / batches if batches else None,
        "largest_batch": max(r["largest_batch"] for r in rounds),
        "cpu_ms_per_item": {k: round(1e3 * v / max(1, items), 3) for k, v in cpu.items()},
        "other_cpu_ms_per_item": round(1e3 * sum(r["other_cpu_s"] for r in rounds) / max(1, items), 3),
        "machine_busy_fraction": round(busy / sum(r["machine_capacity_cpu_s"] for r in rounds), 3),
        "wall_s": [round(r["wall_s"], 3) for r in rounds],
    }


def _key(clients: int, ipr: int) -> str:
    return f"{clients}x{ipr}"


def service_one_size(size: str, reps: int, requests: dict[tuple[int, int], int], limit_seconds: float,
                     dtype: str = "float32", path_args: dict | None = None, clients_on: str = "proxy") -> dict:
    """One reward model size on one request path (`path_args`: the path's app args over configs/serve.yaml's)."""
    import httpx
    from ray import serve

    from rlhf_cluster.actors.group import free_port
    from rlhf_cluster.lib.tiny_models import count_parameters
    from rlhf_cluster.serve.launch import deploy, load_serve_config
    from rlhf_cluster.serve.reward_model import encode_messages, forward, load_reward_model

    model_dir, which, assets = _model_dir(size)
    pool = _items(assets, POOL)
    bodies = {ipr: [json.dumps({"items": [pool[(i + j) % len(pool)] for j in range(ipr)]}).encode()
                    for i in range(0, len(pool), ipr)] for ipr in sorted({ipr for _, ipr in CASES})}
    rm = load_reward_model("reward", str(model_dir), dtype=dtype)
    encoded = [encode_messages(rm, [{"role": "user", "content": it["prompt"]},
                                    {"role": "assistant", "content": it["response"]}]) for it in pool]
    lengths = sorted(len(x) for x in encoded)

    cfg = load_serve_config()
    cfg.applications = [a for a in cfg.applications if a.name == "reward"]
    app_args = dict(cfg.applications[0].args or {})
    replica_cpus = float(app_args.get("num_cpus", 1))
    replica_threads = max(1, int(replica_cpus))  # the replica calls torch.set_num_threads(int(num_cpus))
    port = free_port()
    tmp = tempfile.TemporaryDirectory(prefix="bench-reward-")
    t = time.perf_counter()
    # require_token false: the figures are of scoring, comparable with the earlier ones (the token check is a few
    # constant-time compares; bench/README.md)
    deploy(cfg, http_port=port, arg_overrides={"reward": {
        "models": {"reward": str(model_dir)}, "follow_registry": False, "registry": tmp.name, "dtype": dtype,
        "require_token": False, **(path_args or {})}})
    start_s = time.perf_counter() - t
    base = f"http://127.0.0.1:{port}"
    handle = serve.get_deployment_handle("RewardModel", app_name="reward")
    if clients_on == "replica":  # straight to the replica's own HTTP server, past the proxy
        base = f"http://127.0.0.1:{_replica_port(httpx.get(base + '/healthz', timeout=30).json()['replica'])}"
    rounds: dict[tuple[str, int, int], list[dict]] = {}
    order = []
    try:
        with httpx.Client(base_url=base, timeout=120) as c:
            # the service must score what the model scores when called directly
            direct = [s for ids in encoded[:16] for s in forward(rm, [ids])]
            served = c.post("/v1/score", json={"items": pool[:16]}).json()["scores"]
            max_diff = max(abs(a - b) for a, b in zip(direct, served))
            # bf16: batches padded to other widths round differently (one bf16 step near 2-4 is 0.016)
            tol = 1e-4 if dtype == "float32" else 0.02 * max(1.0, *(abs(x) for x in direct))
            if len(served) != 16 or max_diff > tol:
                raise RuntimeError(f"served scores differ from the model's by {max_diff}: served {served[:4]}, "
                                   f"direct {direct[:4]}")
            log(f"reward_service/{size}: {which} at {model_dir}; Serve up in {start_s:.1f} s; clients on {base}; "
                f"scores match the model (max diff {max_diff:.1e}); items of {lengths[0]}-{lengths[-1]} tokens; "
                f"{reps} reps")
            for clients, ipr in CASES:
                per_client = max(1, requests[(clients, ipr)] // clients)
                for rep in range(reps):
                    modes = list(MODES) if rep % 2 == 0 else list(MODES)[::-1]
                    order.append([_key(clients, ipr), modes])
                    for mode in modes:
                        handle.reconfigure.remote(MODES[mode]).result()
                        b0 = _health(c)["batches"]
                        r = asyncio.run(_round(base, bodies[ipr], ipr, clients, per_client))
                        h = _health(c)
                        r["batches"], r["largest_batch"] = h["batches"] - b0, h["largest_batch"]
                        lat = r["latencies_s"]
                        mean_batch = (len(lat) + clients) * ipr / max(1, r["batches"])
                        if mode == "batched":  # the limit at this round's batch size, measured right after it
                            r["limit_batch"] = max(1, round(mean_batch))
                            r["limit_items_per_s"] = _limit(rm, encoded, [r["limit_batch"]], limit_seconds,
                                                            replica_threads)[r["limit_batch"]]
                        rounds.setdefault((mode, clients, ipr), []).append(r)
                        log(f"reward_service/{size} {clients:>2} clients x {ipr:>2} items {mode:>9} rep {rep + 1}/"
                            f"{reps}: {clients * per_client * ipr / r['wall_s']:6.1f} items/s, p50 "
                            f"{1e3 * percentile(lat, 50) if lat else float('nan'):.0f} ms, errors "
                            f"{len(r['errors']) + len(r['warmup_errors'])}, mean batch {mean_batch:.1f}, "
                            + (f"limit {r['limit_items_per_s']:.0f} items/s at batch {r['limit_batch']}, "
                               if mode == "batched" else "") + "CPU s "
                            + ", ".join(f"{k} {v:.2f}" for k, v in r["cpu_s"].items())
                            + f", others {r['other_cpu_s']:.2f}")
            # leave the replica as configured (it is shut down next anyway)
            handle.reconfigure.remote({k: app_args[k] for k in ("max_batch_size", "batch_wait_timeout_s")}).result()
    finally:
        serve.shutdown()
        tmp.cleanup()

    cases = {mode: {_key(n, ipr): _summarise(rounds[(mode, n, ipr)], n, ipr, max(1, requests[(n, ipr)] // n))
                    for n, ipr in CASES} for mode in MODES}
    # the model's forward by batch size, after Serve is gone (a reference curve; the ratios use the
    # limits measured right after each batched round)
    limit = _limit(rm, encoded, [1, 8, 16, 32, 64], limit_seconds, replica_threads)
    log(f"reward_service/{size}: limit (rlhf_cluster.serve.reward_model.forward in-process, "
        f"{replica_threads} torch thread) "
        + ", ".join(f"batch {k}: {v:.0f}" for k, v in limit.items()) + " items/s")
    ratios = {}
    for n, ipr in CASES:
        k = _key(n, ipr)
        b_rounds, u_rounds = rounds[("batched", n, ipr)], rounds[("unbatched", n, ipr)]
        b, u = cases["batched"][k]["items_per_s"], cases["unbatched"][k]["items_per_s"]
        lim = [r["limit_items_per_s"] for r in b_rounds]
        ratios[k] = {"batched_over_unbatched": median(b) / median(u),
                     "batched_over_unbatched_paired": [x / y for x, y in zip(b, u)],
                     "limit_batch": [r["limit_batch"] for r in b_rounds], "limit_items_per_s": lim,
                     "median_limit_items_per_s": median(lim),
                     "batched_over_limit_paired": [x / y for x, y in zip(b, lim)],
                     "batched_over_limit": median([x / y for x, y in zip(b, lim)]),
                     "unbatched_over_limit_batch1": median(u) / limit[1]}
        assert len(u_rounds) == len(b_rounds)
    errors = sum(c["errors"] + c["warmup_errors"] for m in cases.values() for c in m.values())
    target = ratios[_key(*TARGET_CASE)]
    return {
        "model": size, "model_dir": str(model_dir), "model_kind": which, "parameters": count_parameters(rm.model),
        "items": {"pool": len(pool), "source": "preferences_test.jsonl: chosen and rejected responses",
                  "tokens_min": lengths[0], "tokens_median": lengths[len(lengths) // 2], "tokens_max": lengths[-1]},
        "cases": [_key(n, ipr) for n, ipr in CASES], "repetitions": reps, "order": order,
        "serve_start_s": round(start_s, 1), "verified_max_abs_diff": max_diff,
        "replica": {"num_cpus": replica_cpus, "torch_threads": replica_threads,
                    "num_replicas": app_args.get("num_replicas", 1),
                    "max_ongoing_requests": app_args.get("max_ongoing_requests")},
        "modes": MODES, "results": cases,
        "limit_after_items_per_s": {str(k): v for k, v in limit.items()}, "limit_torch_threads": replica_threads,
        "ratios": ratios, "errors_total": errors, "target_case": _key(*TARGET_CASE),
        "targets": {"zero_errors": errors == 0,
                    "batched_over_limit_ge_0.8": target["batched_over_limit"] >= TARGETS["batched_over_limit"],
                    "batched_over_unbatched_ge_5": target["batched_over_unbatched"]
                    >= TARGETS["batched_over_unbatched"]},
    }


def bench_reward_service(quick: bool, dtype: str = "float32") -> tuple[dict, list[dict]]:
    """`dtype`: what the served model and the in-process limit compute in (reward_service_bf16: bfloat16, Serve's
    default request path only, on a CPU with bf16 units)."""
    import ray
    from ray import serve  # noqa: F401  (imported before any path's env: this driver's handles keep Serve's defaults)

    os.environ.pop("RAY_ADDRESS", None)  # always a private local cluster, never someone else's
    requests = ({(1, 1): 30, (8, 1): 80, (64, 1): 256, (8, 32): 16} if quick
                else {(1, 1): 40, (8, 1): 120, (64, 1): 512, (8, 32): 24})
    config = {"sizes": ["tiny"] if quick else ["tiny", "small"], "repetitions": {"tiny": 1 if quick else 3, "small": 3},
              "request_paths": PATHS if dtype == "float32" else {"default": PATHS["default"]},
              "requests_per_round": {_key(*k): v for k, v in requests.items()},
              "cases": [{"clients": n, "items_per_request": ipr} for n, ipr in CASES], "modes": MODES,
              "targets": {**TARGETS, "case": _key(*TARGET_CASE)},
              "ray": "ray.init(address='local', num_cpus=4)",
              "dtype": f"{dtype} (the served model and the raw forward)",
              "service": "the reward application of configs/serve.yaml (its args: 1 replica, num_cpus 1, "
                         "max_ongoing_requests 64), deployed alone with rlhf_cluster.serve.launch.deploy on 127.0.0.1; "
                         "models: the built-in reward model; follow_registry false. Batching is switched per "
                         "mode by reconfigure(user_config) on the running replica",
              "clients": "asyncio in the benchmark process: one httpx.AsyncClient (one keep-alive connection) per "
                         "client; each sends one untimed request, then all start together and send their "
                         "requests back to back (closed loop); POST /v1/score with prompt/response items",
              "latency": "per request, client-side, from sending it to its parsed, checked response; nearest-rank "
                         "p50/p99 over every timed request of the case's rounds",
              "throughput": "scored items / wall time of a round (common start to last response); median of rounds",
              "cpu": "user+system CPU seconds of the Serve proxy, the replica, the rest of this Ray cluster and "
                     "this process (clients + driver), per scored item; others = the rest of the machine",
              "limit": "rlhf_cluster.serve.reward_model.forward in the benchmark process on the same items "
                       "(right-padded batches in pool order), torch threads = the replica's (1); measured for "
                       "~limit_seconds right after each batched round at that round's mean batch size (Serve idle), "
                       "batched/limit = median of those paired ratios; plus a curve over batch sizes after "
                       "Serve is shut down",
              "limit_seconds": 1.0 if quick else 1.5,
              "errors": "non-200 responses, malformed bodies and client exceptions, warm-up requests included; "
                        "counted, never retried"}
    results = []
    for size in config["sizes"]:
        for path, spec in config["request_paths"].items():  # a fresh Ray for each: Serve reads env when it starts
            env = spec["env"]
            os.environ.update(env)
            ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
            try:
                log(f"reward_service/{size}: request path {path} {spec}")
                results.append(service_one_size(size, config["repetitions"][size], requests, config["limit_seconds"],
                                                dtype, spec["args"], spec["clients"])
                               | {"request_path": path, "env": env, "app_args": spec["args"],
                                  "clients_on": spec["clients"], "dtype": dtype})
            finally:
                ray.shutdown()
                for k in env:
                    os.environ.pop(k, None)
    return config, results


# --------------------------------------------------------------------------- README section
def readme_table(rec: dict) -> list[str]:
    c = rec["config"]
    modes = ", ".join(f"{m} = `max_batch_size` {v['max_batch_size']}, `batch_wait_timeout_s` "
                      f"{v['batch_wait_timeout_s']:g}" for m, v in c["modes"].items())
    lines = [f"### {rec['name']} — `/v1/score` over HTTP, batched vs unbatched, against the model's forward, "
             f"{c['dtype'].split()[0]} (`{rec['_file']}`)", "", *header(rec)]
    for r in rec["results"]:
        t = r["ratios"][r["target_case"]]
        ok = r["targets"]
        lim = ", ".join(f"{k}: {v:,.0f}" for k, v in r["limit_after_items_per_s"].items())
        env = ", ".join([f"`{k}={v}`" for k, v in r.get("env", {}).items()]
                        + [f"app arg `{k}: {json.dumps(v)}`" for k, v in r.get("app_args", {}).items()]
                        + (["clients on the replica's own port"] if r.get("clients_on") == "replica" else []))
        path = f"**{r.get('request_path', 'default')}**" + (f" ({env})" if env else "")
        lines += [f"Model `{r['model']}` ({r['parameters'] / 1e6:.2f} M parameters, {r['model_kind']}), Serve's "
                  f"request path: {path}; items of "
                  f"{r['items']['tokens_min']}–{r['items']['tokens_max']} tokens (median "
                  f"{r['items']['tokens_median']}); one replica, {r['replica']['num_cpus']:g} CPU, "
                  f"{r['replica']['torch_threads']} torch thread; {modes}; {r['repetitions']} rounds per case and "
                  f"mode, alternating; served scores checked against the model (max diff "
                  f"{r['verified_max_abs_diff']:.0e}).", "",
                  "| clients × items/request | mode | requests | errors | p50 ms | p99 ms | items/s | mean batch "
                  "| CPU ms/item: proxy | replica | clients | rest of Ray | others | batched / unbatched "
                  "| batched / limit |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for key in r["cases"]:
            n, ipr = key.split("x")
            for mode in r["results"]:
                x, ratio = r["results"][mode][key], r["ratios"][key]
                lat, cpu = x["latency_ms"] or {"p50": float("nan"), "p99": float("nan")}, x["cpu_ms_per_item"]
                batch = sorted(ratio["limit_batch"])
                extra = (f"**{ratio['batched_over_unbatched']:.2f}×** | **{100 * ratio['batched_over_limit']:.0f} %** "
                         f"(limit {ratio['median_limit_items_per_s']:,.0f} at batch "
                         f"{batch[0] if batch[0] == batch[-1] else f'{batch[0]}–{batch[-1]}'})"
                         if mode == "batched" else " | ")
                lines.append(f"| {n} × {ipr} | {mode} | {x['requests']:,} | {x['errors'] + x['warmup_errors']} | "
                             f"{lat['p50']:,.0f} | {lat['p99']:,.0f} | {x['median_items_per_s']:,.1f} | "
                             f"{x['mean_batch'] or 0:.1f} | {cpu['proxy']:.1f} | {cpu['replica']:.1f} | "
                             f"{cpu['clients']:.1f} | {cpu['ray_rest']:.1f} | {x['other_cpu_ms_per_item']:.1f} | "
                             f"{extra} |")
        lines += ["", "Limit = the same model's `rlhf_cluster.serve.reward_model.forward` in the benchmark process, "
                      f"{r['limit_torch_threads']} torch thread like the replica, at the batched round's mean batch "
                      "size, measured right after each batched round; batched / limit is the median of those paired "
                      "ratios, batched / unbatched the ratio of median throughputs. The same forward after Serve was "
                      f"shut down, items/s by batch size: {lim}.  ",
                  f"Targets at {r['target_case'].replace('x', ' clients × ')} item/request: "
                  f"0 errors — **{'met' if ok['zero_errors'] else 'missed'}** ({r['errors_total']}); "
                  f"batched ≥ 80 % of the limit — **{'met' if ok['batched_over_limit_ge_0.8'] else 'missed'}** "
                  f"({100 * t['batched_over_limit']:.0f} %); batched ≥ 5× unbatched — "
                  f"**{'met' if ok['batched_over_unbatched_ge_5'] else 'missed'}** "
                  f"({t['batched_over_unbatched']:.2f}×).", ""]
    return lines
