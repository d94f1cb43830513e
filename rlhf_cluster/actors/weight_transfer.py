"""GPU weight transports (`rollout.weight_transport`: nccl, ipc) on vLLM's own weight-transfer engines.

On CPU (the default, `object_store`) weights travel as safetensors buckets through the Ray object
store (rlhf_cluster/actors/trainer.py `export_weights`, rlhf_cluster/actors/rollout.py `update_weights`). On GPUs
vLLM 0.32 ships the transports itself, so this module only adapts them to our actors:

- `nccl`: trainer rank 0 and the engine's workers form one NCCL group per engine (vLLM's
  `StatelessProcessGroup` + `PyNcclCommunicator`, rendezvous on a TCP store) and every weight is
  broadcast GPU to GPU. One group per engine: several independent engines would otherwise claim
  the same worker ranks.
- `ipc`: trainer and engines share GPUs (`colocate.all`): every trainer rank exports CUDA IPC
  handles of its gathered weights, rank 0 ships the merged handles, and each vLLM worker maps the
  one on its own GPU (no copy over any wire).

Every trainer rank iterates the source (a ZeRO-3 gather is a collective); only rank 0 talks to
the engines. What runs here on CPU (the source, the config checks) is tested; the GPU data
planes are vLLM's and run when a GPU machine is lent.
"""

from __future__ import annotations

import base64
import pickle
from collections.abc import Callable, Iterator

import torch

try:  # vLLM's interfaces; absent where vLLM is not installed (the source is then a plain class)
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource
except ImportError:  # pragma: no cover
    ParamMeta, WeightSource = None, object


class TrainerSource(WeightSource):
    """The policy's full weights under the plain model's names (ZeRO-3 partitions gathered, LoRA
    merged), as vLLM's trainer engines read them: `metadata()` without sending, then one fresh
    pass per sync, moved to `device`."""

    def __init__(self, full_state_dict: Callable[[], dict[str, torch.Tensor]], device: torch.device | str):
        self._full_state_dict, self._device, self._meta = full_state_dict, torch.device(device), None

    def metadata(self) -> list:
        if self._meta is None:  # one gather (collective on every rank) to learn names, shapes and dtypes
            self._meta = [ParamMeta(name, t.dtype, tuple(t.shape)) for name, t in self._full_state_dict().items()]
        return self._meta

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, t in self._full_state_dict().items():
            yield name, t.to(self._device, non_blocking=True).contiguous()


class EngineClient:
    """vLLM's `VLLMWeightSyncClient` protocol (four calls) onto our RolloutEngine actors. The engine
    actor's own `update_weights` is the object-store path, so the transfer calls are named
    `transfer_*` there."""

    def __init__(self, handles: list):
        self.handles = handles

    def _all(self, method: str, *args):
        import ray

        return ray.get([getattr(h, method).remote(*args) for h in self.handles])

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self._all("transfer_init", init_info)

    def start_weight_update(self) -> None:
        self._all("transfer_start")

    def update_weights(self, update_info) -> None:
        self._all("transfer_update", update_info)

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all("transfer_finish")


def rpc_safe(update_info):
    """IPC handles are tuples that vLLM's RPC encoding does not carry: pickle them into the
    `ipc_handles_pickled` field vLLM's workers decode (with VLLM_ALLOW_INSECURE_SERIALIZATION=1,
    set in the engine actor, which only ever receives them from our own trainer)."""
    if isinstance(update_info, list):
        return [rpc_safe(u) for u in update_info]
    if isinstance(update_info, dict) and update_info.get("ipc_handles") is not None:
        out = {k: v for k, v in update_info.items() if k != "ipc_handles"}
        out["ipc_handles_pickled"] = base64.b64encode(pickle.dumps(update_info["ipc_handles"])).decode()
        return out
    return update_info


def trainer_engine(backend: str, rank: int, handles: list, source: TrainerSource, master_address: str = "",
                   master_port: int = 0, world_size: int = 0):
    """vLLM's trainer-side engine for `backend`, ready to `send_weights()` (called on every rank)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    if backend == "nccl":
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        info = NCCLTrainerInitInfo(master_address=master_address, master_port=master_port, world_size=world_size,
                                   rank=rank)
    elif backend == "ipc":
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

        info = IPCTrainerInitInfo(rank=rank)
    else:
        raise ValueError(f"unknown weight transport {backend!r} (nccl or ipc; object_store needs no engine)")
    return WeightTransferTrainerFactory.trainer_init(info, client=EngineClient(handles), source=source)
