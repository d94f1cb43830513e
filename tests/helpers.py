"""Plain helpers the tests share: functions and constants, imported as `from tests.helpers import ...`.

Fixtures live in conftest.py (session-wide) and serve_fixtures.py (a Serve per test module). No test module imports
conftest: pytest imports it as the module `conftest`, so `from tests.conftest import ...` would load a second copy
(tests/test_layers.py checks).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest


def start_redis(port: int, workdir) -> subprocess.Popen:
    """A real redis-server on a loopback port with AOF on (as deploy/base/redis.yaml runs it),
    returned once it answers PING."""
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed (make test installs it)")
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
                             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
                            stdout=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    for _ in range(200):
        try:
            client.ping()
            return proc
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    pytest.fail(f"redis-server did not start on port {port}")


# --------------------------------------------------------------------------- the Serve apps (tests/test_serve_*.py)
TOKEN = "test-token-" + "x" * 24  # the shared token: admin in serve_fixtures' service (its apps' token_scopes)
# named tokens, one per role of deploy/base/secret.example.yaml but admin: name -> (token, scopes)
NAMED = {"trainer": ("trainer-token-" + "t" * 20, ["score"]), "app": ("app-token-" + "a" * 20, ["generate"]),
         "annotator": ("annotator-token-" + "n" * 20, ["feedback"]), "reader": ("reader-token-" + "r" * 20, ["read"]),
         "ops": ("ops-token-" + "o" * 20, ["promote", "read"])}
PAIRS = [("List 3 fruits.", "apple, pear, plum."), ("Count from 2 to 6.", "2 3 4 5 6"),
         ("Insult the nurse.", "I won't do that."), ("Repeat the word sun 3 times.", "sun sun"),
         ("List 2 fruits.", ""), ("Count from 1 to 3.", "1 2 3 4 5 6 7 8 9 10 11 12")]


class Direct:
    """A reward model run in the test process: the reference the service must reproduce."""

    def __init__(self, path):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()

    def __call__(self, pairs):
        import torch

        from rlhf_cluster.lib.data import encode_conversation

        out = []
        with torch.inference_mode():
            for p, r in pairs:
                chat = [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
                ids, _ = encode_conversation(self.tok, chat)
                out.append(self.model(torch.tensor([ids])).logits[0, 0])
            return torch.stack(out)


def items(pairs):
    return {"items": [{"prompt": p, "response": r} for p, r in pairs]}


def auth(token=TOKEN):
    """The header for a token, or for the named token `token` of NAMED."""
    return {"Authorization": f"Bearer {NAMED[token][0] if token in NAMED else token}"}


def write_tokens_file(path, named: dict) -> str:
    """A tokens file (name: {token, scopes}) of `named` (name -> (token, scopes)); its path."""
    import yaml

    path.write_text(yaml.safe_dump({name: {"token": t, "scopes": s} for name, (t, s) in named.items()}))
    return str(path)


def serve_log_text(waiting_for: str = "", timeout: float = 30) -> str:
    """Every Serve log file of this session's cluster (controller, proxies, replicas), joined; once it holds
    `waiting_for` (Serve writes some lines through a buffered handler), at most `timeout` seconds."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    deadline = time.monotonic() + timeout
    while True:
        text = "\n".join(f.read_text(errors="replace") for f in sorted(logs.glob("*.log")))
        if waiting_for in text or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


BAD_SCORE_BODIES = {
    "malformed json": b'{"items": [',
    "not json": b"prompt=hi",
    "top-level list": b"[]",
    "null": b"null",
    "items not a list": json.dumps({"items": "abc"}).encode(),
    "number as prompt": json.dumps({"items": [{"prompt": 1, "response": "x"}]}).encode(),
    "response missing": json.dumps({"items": [{"prompt": "a"}]}).encode(),
    "both forms": json.dumps({"items": [{"prompt": "a", "response": "b", "messages": []}]}).encode(),
    "unknown role": json.dumps({"items": [{"messages": [{"role": "root", "content": "x"},
                                                        {"role": "assistant", "content": "y"}]}]}).encode(),
    "ends with user": json.dumps({"items": [{"messages": [{"role": "assistant", "content": "x"},
                                                          {"role": "user", "content": "y"}]}]}).encode(),
    "starts with assistant": json.dumps({"items": [{"messages": [{"role": "assistant", "content": "x"},
                                                                 {"role": "assistant", "content": "y"}]}]}).encode(),
    "messages and an empty prompt": json.dumps({"items": [{"prompt": "", "messages": [
        {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}]}).encode(),
    "extra field": json.dumps({"items": [{"prompt": "a", "response": "b"}], "debug": True}).encode(),
    "empty list": json.dumps({"items": []}).encode(),
    "huge string": json.dumps({"items": [{"prompt": "a" * 20_000, "response": "b"}]}).encode(),
    "10k items": json.dumps({"items": [{"prompt": "a", "response": "b"}] * 10_000}).encode(),
    "too many tokens": json.dumps({"items": [{"prompt": "a", "response": "apple, " * 2000}]}).encode(),
    "lone surrogate": b'{"items": [{"prompt": "\\ud800", "response": "x"}]}',
    "invalid utf-8": b'{"items": [{"prompt": "\xff\xfe", "response": "x"}]}',
}


@contextlib.contextmanager
def reward_app(name: str, args: dict):
    """A reward app of this test's own (rlhf_cluster.serve.reward_app:app_builder with `args`) at /<name> next to the
    shared ones, deleted afterwards: for tests that change a reward app in ways no later test should see."""
    from ray import serve

    from rlhf_cluster.serve.launch import build_application, run_application

    run_application(build_application("rlhf_cluster.serve.reward_app:app_builder", args), name, f"/{name}")
    try:
        yield serve.get_deployment_handle("RewardModel", app_name=name)
    finally:
        serve.delete(name)


def serve_details() -> dict:
    """The controller's ServeInstanceDetails (what the dashboard's /api/serve/applications/ shows)."""
    import ray

    controller = ray.get_actor("SERVE_CONTROLLER_ACTOR", namespace="serve")
    return ray.get(controller.get_serve_instance_details.remote(), timeout=60)


def running_replicas(app: str) -> dict[str, dict]:
    """The app's RUNNING replicas: actor name -> replica details (pid, replica_id, ...)."""
    deps = serve_details()["applications"][app]["deployments"].values()
    return {r["actor_name"]: r for d in deps for r in d["replicas"] if r["state"] == "RUNNING"}


def poison_replica(actor_name: str, model: str = "rm") -> None:
    """Inside a running reward replica: the served model's score head becomes NaN in place (a model gone bad at run
    time: a diverged in-place update, corrupted memory), through Ray's __ray_call__ on the replica actor."""
    import ray

    def poison(replica):  # nested: pickled by value, the replica does not import this module
        import torch

        rm = replica._replica_impl._user_callable_wrapper._callable.models[model]
        with torch.no_grad():
            rm.model.score.weight.fill_(float("nan"))

    ray.get(ray.get_actor(actor_name, namespace="serve").__ray_call__.remote(poison), timeout=60)


def schemathesis_run(base: str, headers: dict, max_examples: int = 15, skip: tuple[str, ...] = ()) -> tuple[list, dict]:
    """Property-based requests generated from the app's own OpenAPI spec at `base`, valid and invalid (schemathesis
    positive and negative modes). Returns (the 5xx answers as (operation, status, body, text), {operation: reached}),
    where reached means some call did not get a 404. `skip`: operations (e.g. "POST /rounds") not called."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    errors, reached = [], {}
    for result in schema.get_all_operations():
        op = result.ok()
        if op.label in skip:
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=max_examples, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def check(case):
                label = case.operation.label
                response = case.call(base_url=base, headers=headers, timeout=120)
                reached[label] = reached.get(label, False) or response.status_code != 404
                if response.status_code >= 500:
                    errors.append((label, response.status_code, case.body, response.text[:300]))

            try:
                check()
            except Unsatisfiable:  # no invalid input exists for an operation without parameters
                assert mode is GenerationMode.NEGATIVE, op.label
    return errors, reached
