"""Actor classes the tests start in Ray workers (a test module itself is not importable there)."""

from __future__ import annotations

from rlhf_cluster.actors.group import Worker


class PortTakenOnce(Worker):
    """Joins a one-rank process group; on its first start another socket holds the port first (as when some
    process takes the port between `free_port` and rank 0's listen), on later starts nothing does."""

    def __init__(self, rank, world_size, master_addr, master_port, marker: str):
        import os
        import socket
        from pathlib import Path

        super().__init__(rank, world_size, master_addr, master_port)
        if not Path(marker).exists():
            Path(marker).write_text(str(os.getpid()))
            self.squatter = socket.socket()
            self.squatter.bind(("", master_port))
            self.squatter.listen()
        self.init_distributed()


def parameter_elements(scorer) -> tuple[int, int]:
    """(elements of the parameters a scorer rank holds, of the whole model), through `__ray_call__`: a ZeRO-3
    rank (`partition`) holds its shard of each parameter."""
    params = list(scorer.model.parameters())
    if scorer.partition:
        return sum(p.ds_tensor.numel() for p in params), sum(p.ds_numel for p in params)
    n = sum(p.numel() for p in params)
    return n, n


class LogprobPaths(Worker):
    """One rank of a ZeRO-3 process group that trains a tiny model twice from the same weights, on the full logits
    and on the chunked log-probs (tests/test_logprobs.py)."""

    def __init__(self, rank, world_size, master_addr, master_port):
        super().__init__(rank, world_size, master_addr, master_port)
        self.init_distributed()

    def compare(self, family: str, lora: list[str] | None = None, steps: int = 3) -> dict[str, float]:
        """Largest differences between the two paths: log-probs and entropies of the first step, every full
        gradient after its backward, the no-gradient log-probs and the loss of each step."""
        import torch
        from deepspeed.utils import safe_get_full_grad
        from transformers import AutoConfig, AutoModelForCausalLM

        from rlhf_cluster.lib.algorithms import entropy_from_logits
        from rlhf_cluster.lib.config import TrainerConfig
        from rlhf_cluster.lib.deepspeed_setup import make_engine, with_lora
        from rlhf_cluster.lib.logprobs import model_logprobs
        from rlhf_cluster.lib.losses import logprobs_from_logits
        from rlhf_cluster.lib.packing import packed_batch
        from rlhf_cluster.lib.tiny_models import FAMILIES, SIZES

        g = torch.Generator().manual_seed(1)
        b = packed_batch([torch.randint(3, 300, (n,), generator=g).tolist() for n in (9, 5, 12, 3)],
                         [[0, 1], [2, 3]], 0)
        config = AutoConfig.for_model(family, vocab_size=300, max_position_embeddings=64, pad_token_id=0,
                                      **SIZES["tiny"], **FAMILIES[family])
        t = TrainerConfig(zero_stage=3, micro_batch_size=2,
                          lora={"enabled": lora is not None, "rank": 4, "alpha": 8.0, "target_modules": lora or []})
        runs = {}
        for chunked in (False, True):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config)
            if lora is not None:
                model = with_lora(model, t.lora, "CAUSAL_LM")
                for name, p in model.named_parameters():
                    if "lora_B" in name:  # B starts at zero: make the adapters count
                        torch.nn.init.normal_(p, std=0.1)
            engine = make_engine(model, t, 10)
            run = {"losses": []}
            for step in range(steps):
                if chunked:
                    lp, ent = model_logprobs(engine, b.input_ids, b.attention_mask, b.position_ids, True, 5)
                else:
                    logits = engine(input_ids=b.input_ids, attention_mask=b.attention_mask,
                                    position_ids=b.position_ids).logits[:, :-1]
                    lp, ent = logprobs_from_logits(logits, b.input_ids[:, 1:]), entropy_from_logits(logits)
                loss = 0.3 * lp.mean() + 0.1 * ent.mean()
                engine.backward(loss)
                if step == 0:
                    run["values"] = torch.cat([lp.detach().flatten(), ent.detach().flatten()])
                    run["grads"] = [safe_get_full_grad(p) for p in engine.module.parameters() if p.requires_grad]
                engine.step()
                run["losses"].append(loss.item())
            with torch.no_grad():
                run["after"] = model_logprobs(engine, b.input_ids, b.attention_mask, b.position_ids)[0]
            runs[chunked] = run
        old, new = runs[False], runs[True]
        return {"values": (old["values"] - new["values"]).abs().max().item(),
                "grads": max((a - c).abs().max().item() for a, c in zip(old["grads"], new["grads"])),
                "after": (old["after"] - new["after"]).abs().max().item(),
                "losses": max(abs(a - c) for a, c in zip(old["losses"], new["losses"]))}
