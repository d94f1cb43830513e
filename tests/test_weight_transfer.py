"""The CPU-testable half of the GPU weight transports (rlhf_cluster/actors/weight_transfer.py): the trainer's
weight source as vLLM's trainer engines read it, the IPC-handle encoding vLLM's workers decode,
and the config checks. The NCCL / CUDA IPC data planes themselves are vLLM's and need GPUs."""

from __future__ import annotations

import pytest
import torch

from rlhf_cluster.actors.weight_transfer import TrainerSource, rpc_safe
from rlhf_cluster.lib.config import ConfigError, PPOConfig, load_config


def _state():
    g = torch.Generator().manual_seed(0)
    return {"model.embed_tokens.weight": torch.randn(8, 4, generator=g),
            "model.layers.0.self_attn.q_proj.weight": torch.randn(4, 4, generator=g),
            "model.layers.1.mlp.up_proj.weight": torch.randn(6, 4, generator=g),
            "model.norm.weight": torch.ones(4), "lm_head.weight": torch.randn(8, 4, generator=g)}


def test_trainer_source_metadata_matches_every_fresh_pass():
    calls = []

    def full_state_dict():  # the trainer's gather: a collective, run once per pass
        calls.append(1)
        return _state()

    source = TrainerSource(full_state_dict, "cpu")
    meta = source.metadata()
    assert [(m.name, m.dtype, m.shape) for m in meta] == [(k, v.dtype, tuple(v.shape)) for k, v in _state().items()]
    assert source.metadata() is meta and len(calls) == 1  # learnt once
    for _ in range(2):  # every sync iterates afresh, in metadata order (vLLM checks it per group)
        got = dict(source)
        assert list(got) == [m.name for m in meta]
        assert all(torch.equal(got[k], v) for k, v in _state().items())
        batches = list(source.iter_groups())
        assert [names for names, _ in batches] == [["model.embed_tokens.weight"],
                                                   ["model.layers.0.self_attn.q_proj.weight"],
                                                   ["model.layers.1.mlp.up_proj.weight"],
                                                   ["model.norm.weight", "lm_head.weight"]]
    assert len(calls) == 5


def test_ipc_handles_are_encoded_as_vllm_workers_decode_them(monkeypatch):
    from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferUpdateInfo

    handles = [{"GPU-1234": ("rebuild_cuda_tensor", (torch.float32, (2, 2), b"\x00\x01", 7))}]
    info = {"names": ["w"], "dtype_names": ["float32"], "shapes": [[2, 2]], "ipc_handles": handles}
    safe = rpc_safe(info)
    assert "ipc_handles" not in safe and isinstance(safe["ipc_handles_pickled"], str)
    assert rpc_safe([info])[0] == safe
    monkeypatch.setattr("vllm.envs.VLLM_ALLOW_INSECURE_SERIALIZATION", True, raising=False)
    assert IPCWeightTransferUpdateInfo(**safe).ipc_handles == handles
    nccl = {"names": ["w"], "dtype_names": ["float32"], "shapes": [[2, 2]]}
    assert rpc_safe(nccl) is nccl  # NCCL metadata travels as is


@pytest.mark.parametrize("overrides,message", [
    (["rollout.weight_transport=nccl"], "needs engine=vllm and num_gpus_per_engine > 0"),
    (["rollout.weight_transport=nccl", "rollout.engine=hf", "rollout.num_gpus_per_engine=1"], "needs engine=vllm"),
    (["rollout.weight_transport=nccl", "rollout.num_gpus_per_engine=1"], r"trainer\.num_gpus_per_rank > 0"),
    (["rollout.weight_transport=ipc", "rollout.num_gpus_per_engine=0.5", "trainer.num_gpus_per_rank=0.5"],
     "needs colocate.all"),
])
def test_gpu_transports_are_checked_before_anything_starts(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PPOConfig, None, overrides)


def test_ipc_with_everything_colocated_validates():
    cfg = load_config(PPOConfig, None, [
        "rollout.weight_transport=ipc", "colocate.all=true", "estimator=grpo", "rollout.samples_per_prompt=2",
        "trainer.num_ranks=2", "trainer.num_gpus_per_rank=0.4", "reference.num_ranks=2",
        "reference.num_gpus_per_rank=0.1", "reward_group.num_ranks=2", "reward_group.num_gpus_per_rank=0.1",
        "rollout.num_engines=2", "rollout.num_gpus_per_engine=0.4"])
    assert cfg.colocated_sets() == [["trainer", "reference", "reward_group", "rollout"]]
