"""The fixtures of the reward and checkpoints apps' tests (tests/test_serve_*.py): the running service and the
checkpoints it serves. The helpers that call it (tokens, request bodies, log reading) are in tests/helpers.py.

configs/serve.yaml is deployed through rlhf_cluster.serve.launch (the same code as `python -m rlhf_cluster.serve`)
with a temporary registry, token and checkpoint roots. A test module takes the fixtures with `name =
serve_fixtures.name`: each module then has its own service (started for its first test, shut down after its last), so
no state crosses files. Inside a module the service is shared, and a test that needs particular registry contents or
a particular served model sets them up itself (see tests/test_serve_checkpoints.py).
"""

from __future__ import annotations

import httpx
import pytest
import torch

from rlhf_cluster.actors.group import free_port
from rlhf_cluster.lib.registry import FileRegistry
from tests.helpers import NAMED, TOKEN, write_tokens_file


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
    (following the registry's pointer), the checkpoints app over an empty registry, both behind TOKEN (admin here)
    and the NAMED tokens. The reward app opts out of the token (require_token: false, as on a private network):
    the scoring tests call it without one; tests/test_serve_reward.py checks the default on an app of its own."""
    from ray import serve

    from rlhf_cluster.serve.launch import deploy, load_serve_config

    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "token").write_text(TOKEN + "\n")
    roots = [str(second_rm.parent), str(builtin_assets.root)]
    common = {"registry": str(tmp / "registry"), "token_file": str(tmp / "token"), "token_scopes": ["admin"],
              "tokens_file": write_tokens_file(tmp / "tokens.yaml", NAMED)}
    port = free_port()
    deploy(load_serve_config(), http_port=port, only=["reward", "checkpoints"], arg_overrides={
        "reward": {**common, "models": {"rm": str(builtin_assets.reward_base)}, "num_cpus": 1,
                   "require_token": False},
        "checkpoints": {**common, "checkpoint_roots": roots},
    })
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
        yield {"client": client, "registry": FileRegistry(tmp / "registry"), "common": common, "tmp": tmp}
    serve.shutdown()
