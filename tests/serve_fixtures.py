"""What the tests of the reward and checkpoints apps share (tests/test_serve_*.py): the running service, the
checkpoints it serves, and the helpers that call it.

configs/serve.yaml is deployed through rlhf_cluster.serve.launch (the same code as `python -m rlhf_cluster.serve`)
with a temporary registry, token and checkpoint roots. A test module takes the fixtures with `name =
serve_fixtures.name`: each module then has its own service (started for its first test, shut down after its last), so
no state crosses files. Inside a module the service is shared, and a test that needs particular registry contents or
a particular served model sets them up itself (see tests/test_serve_checkpoints.py).
"""

from __future__ import annotations

import contextlib
import json

import httpx
import pytest
import torch

from rlhf_cluster.lib.data import encode_conversation
from rlhf_cluster.lib.registry import FileRegistry
from tests.conftest import free_port

TOKEN = "test-token-" + "x" * 24
PAIRS = [("List 3 fruits.", "apple, pear, plum."), ("Count from 2 to 6.", "2 3 4 5 6"),
         ("Insult the nurse.", "I won't do that."), ("Repeat the word sun 3 times.", "sun sun"),
         ("List 2 fruits.", ""), ("Count from 1 to 3.", "1 2 3 4 5 6 7 8 9 10 11 12")]


class Direct:
    """A reward model run in the test process: the reference the service must reproduce."""

    def __init__(self, path):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path).eval()

    @torch.inference_mode()
    def __call__(self, pairs) -> torch.Tensor:
        out = []
        for p, r in pairs:
            chat = [{"role": "user", "content": p}, {"role": "assistant", "content": r}]
            ids, _ = encode_conversation(self.tok, chat)
            out.append(self.model(torch.tensor([ids])).logits[0, 0])
        return torch.stack(out)


def items(pairs):
    return {"items": [{"prompt": p, "response": r} for p, r in pairs]}


def auth(token=TOKEN):
    return {"Authorization": f"Bearer {token}"}


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


@pytest.fixture(scope="module")
def second_rm(builtin_assets, tmp_path_factory):
    """A second reward checkpoint: the built-in one with a perturbed score head."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    root = tmp_path_factory.mktemp("ckpts")
    model = AutoModelForSequenceClassification.from_pretrained(builtin_assets.reward_base)
    torch.manual_seed(1)
    with torch.no_grad():
        model.score.weight.add_(torch.randn_like(model.score.weight))
    model.save_pretrained(root / "rm_v2")
    AutoTokenizer.from_pretrained(builtin_assets.reward_base).save_pretrained(root / "rm_v2")
    return root / "rm_v2"


@pytest.fixture(scope="module")
def nan_rm(second_rm):
    """A reward checkpoint whose score head is NaN: loads fine, and every score it gives is NaN (a diverged run)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = second_rm.parent / "rm_nan"
    model = AutoModelForSequenceClassification.from_pretrained(second_rm)
    with torch.no_grad():
        model.score.weight.fill_(float("nan"))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(second_rm).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def service(ray_cluster, builtin_assets, second_rm, tmp_path_factory):
    """configs/serve.yaml on a real local Ray Serve: the reward app serving the built-in reward model as "rm"
    (following the registry's pointer), the checkpoints app over an empty registry, both behind TOKEN."""
    from ray import serve

    from rlhf_cluster.serve.launch import deploy, load_serve_config

    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "token").write_text(TOKEN + "\n")
    roots = [str(second_rm.parent), str(builtin_assets.root)]
    common = {"registry": str(tmp / "registry"), "token_file": str(tmp / "token")}
    port = free_port()
    deploy(load_serve_config(), http_port=port, only=["reward", "checkpoints"], arg_overrides={
        "reward": {**common, "models": {"rm": str(builtin_assets.reward_base)}, "num_cpus": 1},
        "checkpoints": {**common, "checkpoint_roots": roots},
    })
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
        yield {"client": client, "registry": FileRegistry(tmp / "registry"), "common": common, "tmp": tmp}
    serve.shutdown()


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
