"""DeepSpeed-trained actor groups: the policy trainer and the critic.

A rank holds one DeepSpeed engine (ZeRO stage from config) and calls the pure functions of
rlhf_cluster.lib.algorithms. Items are dicts of per-sequence lists:
    input_ids [T], loss_mask [T-1] (1 where token t+1 is a response token), and per-token
    fields of length T-1 that a loss needs (old_logprobs, advantages, returns, old_values).
Micro-batches hold `micro_batch_size` padded items, or with `max_tokens_per_micro_batch` items packed
into rows (lib/packing.py). Under ZeRO-3 every rank must run the same number of forward passes: ranks
agree on the count and a rank with fewer runs zero-weight padding passes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from rlhf_cluster.actors.group import Worker
from rlhf_cluster.lib import algorithms as A
from rlhf_cluster.lib import faults
from rlhf_cluster.lib.config import TrainerConfig
from rlhf_cluster.lib.logprobs import model_logprobs
from rlhf_cluster.lib.packing import Packed, micro_batch_rows, packed_batch, place, take

PER_TOKEN_FIELDS = ("loss_mask", "old_logprobs", "advantages", "returns", "old_values", "ref_logprobs",
                    "is_weights")


@dataclass
class MicroBatch:
    ids: torch.Tensor
    att: torch.Tensor
    pos: torch.Tensor | None
    fields: dict[str, torch.Tensor]  # [R, W-1] each; position t predicts token t+1 of its row
    packed: Packed  # where each item sits, for reading outputs back
    n_real: int  # items in it (0: a padding pass)


def micro_batches(items: list[dict], plan: list[list[list[int]]], pad_id: int, num_micro: int) -> list[MicroBatch]:
    """`num_micro` micro-batches of `items` laid out as `plan` (lib.packing.micro_batch_rows); passes
    beyond the plan run on a filler item with an all-zero loss mask (same computation, no weight)."""
    filler = items[0] if items else {"input_ids": [pad_id, pad_id], "loss_mask": [0]}
    filler = dict(filler, loss_mask=[0] * len(filler["loss_mask"]))
    out = []
    for m in range(num_micro):
        chunk, rows = (items, plan[m]) if m < len(plan) else ([filler], [[0]])
        p = packed_batch([it["input_ids"] for it in chunk], rows, pad_id)
        width = p.input_ids.shape[1] - 1
        fields = {key: place(p, [it.get(key, ()) for it in chunk], width)
                  for key in PER_TOKEN_FIELDS if key in chunk[0]}
        out.append(MicroBatch(p.input_ids, p.attention_mask, p.position_ids, fields, p,
                              sum(len(r) for r in rows) if m < len(plan) else 0))
    return out


def all_reduce(value: float, op: str = "sum") -> float:
    """`value` reduced (sum, max or min) over the group's ranks; itself outside a process group."""
    t = torch.tensor([float(value)])
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=getattr(torch.distributed.ReduceOp, op.upper()))
    return t.item()


def all_ranks_finite(value: torch.Tensor) -> bool:
    """True when `value` is finite on every rank. All ranks agree before anyone calls backward, so a
    NaN on one rank cannot leave the others waiting in a collective."""
    return all_reduce(1.0 if torch.isfinite(value).all() else 0.0, "min") == 1.0


def master_partitions(engine) -> list[torch.Tensor]:
    """The optimiser's fp32 master copy of this rank's weights, where it keeps one apart from the module's
    (ZeRO-3, ZeRO-1/2, DeepSpeed's bf16 optimiser); empty where the module's weights are the master."""
    for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        if hasattr(engine.optimizer, name):
            return list(getattr(engine.optimizer, name))
    return []


def _layer_key(name: str) -> str:
    """Group parameter names so HF's q/k/v and gate/up match vLLM's fused qkv_proj/gate_up_proj."""
    parts = name.split(".")
    if parts[-2].endswith("_proj"):
        return ".".join(parts[:-2])
    return name


def add_checksum(acc: dict, name: str, t: torch.Tensor) -> None:
    """Accumulate a tensor's (sum, sum of squares) in float64 into its layer's entry of `acc`."""
    t = t.detach().double()
    s, ss = acc.get(_layer_key(name), (0.0, 0.0))
    acc[_layer_key(name)] = (s + t.sum().item(), ss + (t * t).sum().item())


def checksums(named: dict[str, torch.Tensor]) -> dict[str, tuple[float, float]]:
    """Per-layer (sum, sum of squares): additive, so fused and split layouts agree."""
    acc: dict = {}
    for name, t in named.items():
        add_checksum(acc, name, t)
    return acc


class _DeepSpeedRank(Worker):
    model_class = "AutoModelForCausalLM"
    lora_task_type = "CAUSAL_LM"

    def __init__(self, rank, world_size, master_addr, master_port, model_path: str, trainer: dict,
                 total_steps: int, dtype: str = "float32", seed: int = 0, sleep: bool = False, **model_kwargs):
        super().__init__(rank, world_size, master_addr, master_port)
        import transformers

        from rlhf_cluster.lib.deepspeed_setup import load_pretrained, make_engine

        torch.manual_seed(seed)
        self.init_distributed()
        self.cfg = TrainerConfig.model_validate(trainer)
        cls = getattr(transformers, self.model_class)
        model = load_pretrained(cls, model_path, self.cfg, dtype, **model_kwargs)
        self.pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        if self.cfg.lora.enabled:  # only the adapters train; exports and syncs carry merged weights
            from rlhf_cluster.lib.deepspeed_setup import with_lora

            model = with_lora(model, self.cfg.lora, self.lora_task_type)
        # one optimiser step per train_step call (a PPO mini-batch), however many micro-batches it takes
        self.engine = make_engine(model, self.cfg, total_steps, dtype, managed_accumulation=False, sleep=sleep)
        self.steps = 0
        self.asleep = False

    # -- the pieces a loss needs -------------------------------------------------------------
    def _forward(self, ids, att, pos, with_entropy: bool = False):
        raise NotImplementedError

    def _micro_batches(self, items: list[dict]) -> list[MicroBatch]:
        """This rank's micro-batches, as many as the rank with the most (ZeRO-3 collectives)."""
        plan = micro_batch_rows([len(it["input_ids"]) for it in items], self.cfg.micro_batch_size,
                                self.cfg.max_tokens_per_micro_batch)
        return micro_batches(items, plan, self.pad_id, int(all_reduce(len(plan), "max")))

    def _per_token(self, items: list[dict]) -> list[list[float]]:
        """The model's per-token output (log-probs or values) for each item, [len(input_ids) - 1] each."""
        out: dict[int, list[float]] = {}
        for mb in self._micro_batches(items):
            if mb.n_real:
                values = self._forward(mb.ids, mb.att, mb.pos)[0]
                out |= take(mb.packed, values, {i: len(items[i]["input_ids"]) - 1 for i in mb.packed.places})
            else:
                self._forward(mb.ids, mb.att, mb.pos)
        return [out[i] for i in range(len(items))]

    def set_micro_batching(self, micro_batch_size: int | None = None, max_tokens_per_micro_batch: int | None = None):
        """Change how calls split their items (benchmarks and tests compare padded and packed on one state)."""
        self.cfg = self.cfg.model_copy(update={"micro_batch_size": micro_batch_size or self.cfg.micro_batch_size,
                                               "max_tokens_per_micro_batch": max_tokens_per_micro_batch})

    # -- training ----------------------------------------------------------------------------
    def train_step(self, items: list[dict], loss: str, **loss_kwargs) -> dict:
        """One optimiser step on this rank's share of a mini-batch. Each micro-batch's loss (a mean over its
        tokens, or sequences with a sequence loss_agg) is weighted by its share of the whole mini-batch's
        tokens (all ranks), so the step does not depend on how the mini-batch is split into micro-batches
        or packed; DeepSpeed then averages the gradients across ranks and steps."""
        self.wake()
        self.engine.train()
        loss_fn = getattr(self, f"_loss_{loss}", None)
        if loss_fn is None:
            raise ValueError(f"unknown loss {loss!r} for {type(self).__name__}")
        t0 = time.time()
        batches = self._micro_batches(items)
        agg = loss_kwargs.get("loss_agg", "token")
        units = [A.aggregation_units(mb.fields["loss_mask"], agg) for mb in batches]
        scale = (torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1) / max(
            1.0, all_reduce(sum(units)))
        sums: dict[str, float] = {}
        counted, counted_units, skipped_micro = 0, 0, 0
        optimizer_skips, optimizer_steps = self.engine.skipped_steps, self.engine.global_steps
        faults.at("before_forward")
        for mb, n in zip(batches, units):
            value, metrics = loss_fn(mb.ids, mb.att, mb.pos, mb.fields, **loss_kwargs)
            if not all_ranks_finite(value.detach()):
                # a non-finite loss on any rank: every rank drops this micro-batch (it adds no gradient)
                skipped_micro += 1
                continue
            self.engine.backward(value * (n * scale))
            if n:
                counted, counted_units = counted + mb.n_real, counted_units + n
                for k, v in {"loss": value.item(), **metrics}.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * n
        faults.at("before_optimizer_step")
        if skipped_micro < len(batches):  # the same on every rank (all_ranks_finite agrees)
            self.engine.step()  # DeepSpeed skips the optimiser step itself when the gradient norm is not finite
        faults.at("after_optimizer_step")
        self.steps += 1
        out = {k: v / max(1, counted_units) for k, v in sums.items()}
        out.update(lr=self.engine.get_lr()[0], seconds=time.time() - t0, items=counted, units=counted_units,
                   skipped_micro_batches=skipped_micro, micro_batches=len(batches),
                   optimizer_steps=self.engine.global_steps - optimizer_steps,
                   skipped_optimizer_steps=self.engine.skipped_steps - optimizer_skips)
        return out

    def inject_nonfinite_gradient(self, backward_passes: int = 1) -> None:
        """Fault drill (docs/reliability.md): the next `backward_passes` backward passes on this rank
        give the first parameter an infinite gradient, as an overflow would."""
        param = next(p for p in self.engine.module.parameters() if p.requires_grad)
        left = [backward_passes]

        def poison(grad):
            if left[0] <= 0:
                return grad
            left[0] -= 1
            return torch.full_like(grad, float("inf"))

        param.register_hook(poison)

    def arm_fault(self, point: str, fault: str) -> None:
        """Fault drill: when this rank next passes `point` (lib/faults.py), its weights are poisoned
        (`poison_weights`) or its process is killed (SIGKILL: a crash, not a polite exit)."""
        import os
        import signal

        actions = {"poison": self.poison_weights, "kill": lambda: os.kill(os.getpid(), signal.SIGKILL)}
        if fault not in actions:
            raise ValueError(f"unknown fault {fault!r}; one of {', '.join(actions)}")
        faults.arm(point, actions[fault])

    def poison_weights(self) -> None:
        """Fault drill: this rank's ZeRO-3 partition of one matrix (without ZeRO-3: the matrix), and the
        optimiser's master copy of its first group, become NaN in place, as a diverged update or corrupted memory
        would leave them."""
        p = next(p for p in self.engine.module.parameters() if getattr(p, "ds_tensor", p).numel())
        getattr(p, "ds_tensor", p).data.fill_(float("nan"))
        for master in master_partitions(self.engine)[:1]:
            master.data.fill_(float("nan"))

    def weights_finite(self) -> bool:
        """Every rank's parameters (its ZeRO-3 partition) are finite: checked before a checkpoint,
        so a poisoned state is never saved."""
        self.wake()
        local = torch.tensor([1.0])
        # ZeRO-3 keeps this rank's partition in ds_tensor; the optimiser's master copy is what the next step
        # writes the weights from and what a checkpoint saves
        held = [getattr(p, "ds_tensor", p) for p in self.engine.module.parameters()] + master_partitions(self.engine)
        for t in held:
            if t.numel() and not torch.isfinite(t.detach()).all():
                local[0] = 0.0
                break
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(local, op=torch.distributed.ReduceOp.MIN)
        return local.item() == 1.0

    def sleep(self) -> int:
        """colocate.sleep, while the engines generate: optimizer state, fp32 weights and gradient buffers to host
        memory (DeepSpeed offload_states); the bf16 weights stay for the weight sync. Returns the device bytes
        freed."""
        from deepspeed.runtime.zero.offload_config import OffloadStateTypeEnum as S

        if self.asleep:
            return 0
        before = torch.cuda.memory_allocated()
        self.engine.offload_states(include=[S.optim_states, S.hp_params, S.contiguous_grad_buffer, S.lp_grads],
                                   pin_memory=True, non_blocking=False)
        torch.cuda.empty_cache()
        self.asleep = True
        return before - torch.cuda.memory_allocated()

    def wake(self) -> None:
        """Back on the device before a step, a checkpoint or a weights check."""
        if self.asleep:
            self.engine.reload_states()
            self.asleep = False

    def save(self, path: str, tag: str = "state", client_state: dict | None = None) -> dict:
        """Full training state (weights, optimiser, scheduler) via DeepSpeed; all ranks take part. `path`: a
        directory, or a storage URI that this rank uploads its own files to (rlhf_cluster/lib/storage.py);
        returns the manifest of what it uploaded (empty for a directory)."""
        from rlhf_cluster.lib.storage import staged

        self.wake()
        with staged(path) as (local, manifest):
            self.engine.save_checkpoint(str(local), tag=tag,
                                        client_state={"steps": self.steps, **(client_state or {})})
            faults.at("checkpoint_write")
        return manifest

    def load(self, path: str, tag: str = "state", manifest: dict | None = None) -> dict:
        """From a directory, or a storage URI whose `manifest` lists its files: this rank downloads the shared
        files and its own ZeRO partition only."""
        from rlhf_cluster.lib.storage import fetched

        self.wake()
        mine = f"zero_pp_rank_{self.rank}_"
        with fetched(path, manifest, lambda rel: "zero_pp_rank_" not in rel or mine in rel) as local:
            _, client = self.engine.load_checkpoint(str(local), tag=tag, load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
        if client is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint {tag!r} under {path}")
        self.steps = client["steps"]
        return client

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The full weights under the plain model's names (LoRA merged), on every rank."""
        from rlhf_cluster.lib.deepspeed_setup import gathered_state_dict, merged_lora_state_dict

        state = gathered_state_dict(self.engine)
        if self.cfg.lora.enabled:
            state = merged_lora_state_dict(state, self.cfg.lora.alpha, self.cfg.lora.rank)
        return state

    def checksum(self) -> dict[str, tuple[float, float]]:
        return checksums(self.full_state_dict())

    # -- GPU weight transports (rollout.weight_transport nccl / ipc; rlhf_cluster/actors/weight_transfer.py) -------
    def rendezvous_address(self) -> tuple[str, int]:
        """This rank's node address and a free port there, for an NCCL rendezvous it will host."""
        from rlhf_cluster.actors.group import node_address_and_free_port

        return node_address_and_free_port()

    def init_weight_transfer(self, backend: str, engines: list, master_address: str = "", master_port: int = 0,
                             world_size: int = 0) -> None:
        """Join vLLM's trainer-side transfer engine for `engines` (every rank: the gathers are
        collectives; rank 0 rendezvouses and sends). Called once per NCCL group / once for IPC."""
        from rlhf_cluster.actors.weight_transfer import TrainerSource, trainer_engine

        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        source = TrainerSource(self.full_state_dict, device)
        engine = trainer_engine(backend, self.rank, engines, source, master_address, master_port, world_size)
        self._transfers = [*getattr(self, "_transfers", []), engine]

    def send_weights(self) -> None:
        for engine in getattr(self, "_transfers", []):
            engine.send_weights()
        faults.at("export")

    def save_pretrained(self, path: str) -> dict:
        """HF-format export (rank 0 writes; every rank must call, ZeRO-3 gathers) to a directory, or to a storage
        URI (returns the manifest of the files uploaded; empty for a directory or on other ranks)."""
        from rlhf_cluster.lib.storage import is_uri, staged

        state = self.full_state_dict()
        if self.rank != 0:
            return {}
        module = self.engine.module
        if self.cfg.lora.enabled:  # the base model's config and class, with the merged weights
            module = module.get_base_model()
        if is_uri(path):
            with staged(path) as (local, manifest):
                module.save_pretrained(local, state_dict=state, safe_serialization=True)
            return manifest
        from rlhf_cluster.lib.files import replaced_dir

        with replaced_dir(path) as tmp:
            module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        return {}


class PolicyTrainer(_DeepSpeedRank):
    """The policy: per-token log-probs (and entropy), SFT / PPO steps, weight export for sync."""

    model_class = "AutoModelForCausalLM"

    def _forward(self, ids, att, pos, with_entropy=False):
        # from the last hidden states a chunk of tokens at a time: no [tokens, vocab] logits (lib/logprobs.py)
        return model_logprobs(self.engine, ids, att, pos, with_entropy)

    @torch.no_grad()
    def logprobs(self, items: list[dict]) -> list[list[float]]:
        self.engine.eval()
        return self._per_token(items)

    def _loss_sft(self, ids, att, pos, f):
        logp, _ = self._forward(ids, att, pos)
        return A.masked_nll(logp, f["loss_mask"]), {}

    def _loss_ptx(self, ids, att, pos, f, coef: float = 1.0):
        logp, _ = self._forward(ids, att, pos)
        loss = A.ptx_loss(logp, f["loss_mask"], coef)
        return loss, {"nll": A.masked_nll(logp.detach(), f["loss_mask"]).item()}

    def _loss_ppo(self, ids, att, pos, f, clip_eps: float = 0.2, entropy_coef: float = 0.0,
                  dual_clip: float | None = None, loss_agg: str = "token", clip_eps_high: float | None = None,
                  norm_length: int | None = None, kl_coef: float = 0.0):
        logp, ent = self._forward(ids, att, pos, with_entropy=True)
        mask = f["loss_mask"]
        pg, clip_frac = A.clipped_policy_loss(logp, f["old_logprobs"], f["advantages"], mask, clip_eps,
                                              dual_clip, loss_agg, f.get("is_weights"), clip_eps_high, norm_length)
        loss = pg + A.entropy_bonus(ent, mask, entropy_coef, loss_agg, norm_length)
        metrics = {}
        if "ref_logprobs" in f:  # kl_mode: loss
            kl = A.kl_loss(logp, f["ref_logprobs"], mask, kl_coef, loss_agg, norm_length)
            loss = loss + kl
            metrics["kl_loss"] = kl.item()
        approx_kl = A.masked_mean(f["old_logprobs"] - logp.detach(), mask)
        return loss, {"clip_frac": clip_frac.item(), "entropy": A.masked_mean(ent, mask).item(),
                      "approx_kl": approx_kl.item(), **metrics}

    def export_weights(self, bucket_bytes: int = 64 << 20) -> list:
        """Gather the full weights and return them as safetensors-serialised buckets (rank 0).

        Buckets go into the Ray object store once; every rollout engine reads the same objects.
        """
        import ray
        from safetensors.torch import save

        state = self.full_state_dict()
        faults.at("export")
        if self.rank != 0:
            return []
        refs, bucket, size = [], {}, 0
        for name, t in state.items():
            bucket[name] = t.contiguous()
            size += t.numel() * t.element_size()
            if size >= bucket_bytes:
                refs.append(ray.put(save(bucket)))
                bucket, size = {}, 0
        if bucket:
            refs.append(ray.put(save(bucket)))
        return refs


class Critic(_DeepSpeedRank):
    """Per-token values from a token-classification head (one output) on the LM backbone.

    Loaded from a reward model directory, the head starts as the reward model's scorer
    (the weights are named alike); from a policy directory it starts random.
    """

    model_class = "AutoModelForTokenClassification"
    lora_task_type = "TOKEN_CLS"

    def __init__(self, *args, **kwargs):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(args[4] if len(args) > 4 else kwargs["model_path"])
        config.num_labels, config.classifier_dropout = 1, 0.0  # values are regression outputs
        super().__init__(*args, config=config, **kwargs)

    def _forward(self, ids, att, pos, with_entropy=False):
        return self.engine(input_ids=ids, attention_mask=att, position_ids=pos).logits[:, :-1, 0].float(), None

    @torch.no_grad()
    def values(self, items: list[dict]) -> list[list[float]]:
        self.engine.eval()
        return self._per_token(items)

    def _loss_value(self, ids, att, pos, f, clip_eps: float = 0.2, loss_agg: str = "token",
                    norm_length: int | None = None):
        values, _ = self._forward(ids, att, pos)
        return A.clipped_value_loss(values, f["old_values"], f["returns"], f["loss_mask"], clip_eps, loss_agg,
                                    norm_length), {}

