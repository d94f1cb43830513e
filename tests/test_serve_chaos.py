"""Serve under faults and load (`make chaos`; docs/reliability.md): 32 loopback clients score on a two-replica reward
app and read the checkpoints app while, one after the other, one replica's model is poisoned in place (its weights
become NaN: it must stop answering with scores, and be replaced), the other replica's process is SIGKILLed (and
replaced), and a new reward checkpoint is promoted through the checkpoints app. Each fault comes once the app has
two healthy replicas again: with two replicas, one at a time is what can be ridden out without a failed request.

The client side retries: a 5xx or a dropped connection is sent again up to RETRIES times, 0.25 s doubling
(docs/serving.md recommends the same to users). A request counts as failed only when every try failed; the target
is 0. The p99 latency (all tries of a request) is reported per phase and recorded in docs/reliability.md.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest
import torch

from rlhf_cluster.lib.registry import make_entry
from tests import serve_fixtures
from tests.helpers import PAIRS, TOKEN, Direct, auth, items, poison_replica, reward_app, running_replicas

pytestmark = [pytest.mark.ray, pytest.mark.chaos]

service, second_rm = serve_fixtures.service, serve_fixtures.second_rm  # fixtures

CLIENTS = 32
CHECKPOINT_CLIENTS = 4  # of the 32: the checkpoints app (list, one entry, a file download)
RETRIES = 5
POISON_AT, AFTER = 10, 15  # the first fault 10 s into the load; the load goes on 15 s after the promotion


def call(client: httpx.Client, method: str, url: str, **kw) -> tuple[int | str, int, httpx.Response | None]:
    """One request with the client-side retry policy: (final status or error, tries, response)."""
    delay, last = 0.25, None
    for attempt in range(1, RETRIES + 2):
        try:
            r = client.request(method, url, **kw)
            if r.status_code < 500:
                return r.status_code, attempt, r
            last = r.status_code
        except httpx.HTTPError as e:
            last = type(e).__name__
        if attempt <= RETRIES:
            time.sleep(delay)
            delay *= 2
    return last, RETRIES + 1, None


@pytest.mark.timeout(900)
def test_replicas_poisoned_and_killed_under_load_are_replaced_and_a_promotion_lands(service, builtin_assets,
                                                                                    second_rm):

    c, reg = service["client"], service["registry"]
    reg.register(make_entry(builtin_assets.reward_base, run="chaos", kind="reward", stage="reward", id="rm-v1"))
    reg.register(make_entry(second_rm, run="chaos", kind="reward", stage="reward", id="rm-v2"))
    reg.promote("rm-v1")
    old, new = Direct(builtin_assets.reward_base)(PAIRS), Direct(second_rm)(PAIRS)
    args = {**service["common"], "models": {"rm": str(builtin_assets.reward_base)}, "num_replicas": 2,
            "num_cpus": 0.25}
    with reward_app("chaos", args):
        first = running_replicas("chaos")
        assert len(first) == 2
        results, stop, t0 = [], threading.Event(), time.monotonic()

        def score_loop():
            with httpx.Client(base_url=c.base_url, timeout=60, headers=auth("trainer")) as cc:
                while not stop.is_set():
                    start = time.monotonic()
                    status, tries, r = call(cc, "POST", "/chaos/v1/score", json=items(PAIRS))
                    which = None
                    if status == 200:
                        s = torch.tensor(r.json()["scores"])
                        which = ("old" if torch.allclose(s, old, atol=1e-4) else
                                 "new" if torch.allclose(s, new, atol=1e-4) else "wrong")
                    results.append(("score", start - t0, time.monotonic() - start, status, tries, which))

        def checkpoints_loop():
            with httpx.Client(base_url=c.base_url, timeout=60, headers=auth(TOKEN)) as cc:
                for i in range(10**9):
                    if stop.is_set():
                        return
                    url = ["/v1/checkpoints", "/v1/checkpoints/rm-v1", "/v1/checkpoints/rm-v1/files/config.json"][i % 3]
                    start = time.monotonic()
                    status, tries, _ = call(cc, "GET", url)
                    results.append(("checkpoints", start - t0, time.monotonic() - start, status, tries, None))

        threads = [threading.Thread(target=checkpoints_loop if i < CHECKPOINT_CLIENTS else score_loop)
                   for i in range(CLIENTS)]
        for t in threads:
            t.start()
        events = {}

        def replaced(gone: str, deadline_s: float = 180) -> float:
            """Seconds into the load when `gone` has left and two replicas run again."""
            deadline = time.monotonic() + deadline_s
            while True:
                running = running_replicas("chaos")
                if gone not in running and len(running) == 2:
                    return round(time.monotonic() - t0, 1)
                assert time.monotonic() < deadline, f"{gone} was not replaced: {sorted(running)}"
                time.sleep(0.5)

        try:
            names = sorted(first)
            time.sleep(POISON_AT)

            poison_replica(names[0])
            events["poisoned"] = round(time.monotonic() - t0, 1)
            events["poisoned replica replaced"] = replaced(names[0])
            os.kill(first[names[1]]["pid"], signal.SIGKILL)
            events["killed"] = (round(time.monotonic() - t0, 1), first[names[1]]["pid"])
            events["killed replica replaced"] = replaced(names[1])
            r = c.post("/v1/checkpoints/rm-v2/promote", headers=auth())
            assert r.status_code == 200, r.text
            events["promoted"] = (round(time.monotonic() - t0, 1), r.json()["serving"]["id"])
            time.sleep(AFTER)
        finally:
            stop.set()
            for t in threads:
                t.join(120)
        now = running_replicas("chaos")
        healthz = [c.get("/chaos/healthz").json() for _ in range(6)]

    failed = [r for r in results if r[3] not in (200,)]
    retried = sum(r[4] > 1 for r in results)

    def p(phase, lo, hi, q):
        lat = sorted(r[2] for r in results if r[0] == phase and lo <= r[1] < hi)
        return round(lat[min(len(lat) - 1, int(q * len(lat)))], 3) if lat else None

    windows = {"before": (0, events["poisoned"]), "poisoned": (events["poisoned"], events["killed"][0]),
               "killed": (events["killed"][0], events["promoted"][0]), "promotion": (events["promoted"][0], 10**6)}
    report = {phase: {w: {"n": sum(r[0] == phase and lo <= r[1] < hi for r in results),
                          "p50_s": p(phase, lo, hi, 0.5), "p99_s": p(phase, lo, hi, 0.99)}
                      for w, (lo, hi) in windows.items()} for phase in ("score", "checkpoints")}
    print(f"\nserve chaos: {len(results)} requests, {len(failed)} failed after retries, {retried} retried; "
          f"events {events}; replicas {sorted(first)} -> {sorted(now)}; latency {report}")
    assert not failed, failed[:10]
    # the poisoned and the killed replica were both replaced; two healthy replicas serve again
    assert len(now) == 2 and not set(now) & set(first), (sorted(first), sorted(now))
    assert all(h["status"] == "ok" and h["models"]["rm"]["checkpoint_id"] == "rm-v2" for h in healthz), healthz
    # never a wrong (NaN-poisoned, mixed) answer; rm-v1's before the promotion, rm-v2's once the replicas followed
    # the registry (each within a health-check period, 5 s, and its load)
    scored = [r for r in results if r[0] == "score"]
    assert all(r[5] in ("old", "new") for r in scored)
    assert all(r[5] == "old" for r in scored if r[1] + r[2] < events["promoted"][0] - 1)
    assert all(r[5] == "new" for r in scored if r[1] > events["promoted"][0] + 15)
    assert sum(r[0] == "checkpoints" for r in results) > 50 and len(scored) > 300
