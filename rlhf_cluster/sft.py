"""Supervised fine-tuning (Llama 2 style) as a Ray Train job with DeepSpeed workers.

    python -m rlhf_cluster.sft [--config configs/sft-tiny.yaml] [key=value ...]

The loss is cross-entropy on response tokens only (prompt tokens masked); multi-turn chats
train on every assistant turn. With no data given it teaches the built-in base model (random
weights) the built-in task from the demonstrator's data. Measured on held-out data: response
loss on sft_val.jsonl, and the gold score of responses sampled with vLLM on the test prompts,
before and after training.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from rlhf_cluster import scaffold, stages
from rlhf_cluster.lib.config import SFTConfig
from rlhf_cluster.lib.packing import first_fit, packed_batch, place

TASK_TYPE = "CAUSAL_LM"


def resolve(cfg: SFTConfig) -> dict:
    """Model and data paths; the built-in task and base model fill what the config leaves null."""
    return stages.resolve_paths(cfg, "sft", lambda assets: assets.base)


def load_data(cfg: SFTConfig, paths: dict, tokenizer, log=None):
    d = cfg.data
    train, held, report = stages.load_train_and_held(cfg, paths, tokenizer, "sft", log)
    if cfg.packing:
        train = pack(train, d.max_sequence_tokens)
        if log:
            log(f"packed into {len(train)} rows of <= {d.max_sequence_tokens} tokens")
    return train, held, report


def pack(samples: list, max_tokens: int) -> list[list]:
    """Samples packed into rows of at most `max_tokens` tokens (lib/packing.py), rows in a seeded order."""
    rows = first_fit([len(s.input_ids) for s in samples], max_tokens)
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    return [[samples[i] for i in rows[r]] for r in order]


def collate(items: list, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch of samples (or packed rows of samples) with loss mask and positions."""
    rows = [item if isinstance(item, list) else [item] for item in items]
    samples = [s for row in rows for s in row]
    starts = [0, *itertools.accumulate(len(row) for row in rows)]
    b = packed_batch([s.input_ids for s in samples], [list(range(a, z)) for a, z in zip(starts, starts[1:])], pad_id)
    mask = place(b, [s.loss_mask for s in samples], b.input_ids.shape[1]).long()
    return {"input_ids": b.input_ids, "loss_mask": mask, "position_ids": b.position_ids,
            "attention_mask": b.attention_mask}


def train_loop(config: dict) -> None:
    """One Ray Train worker: a DeepSpeed engine on the policy, trained by the shared loop."""
    from transformers import AutoModelForCausalLM

    from rlhf_cluster.lib.logprobs import model_logprobs
    from rlhf_cluster.lib.losses import masked_nll

    cfg, paths, tokenizer, train, held = stages.start_worker(config, SFTConfig, load_data)
    engine = stages.stage_engine(cfg, AutoModelForCausalLM, paths["model"], TASK_TYPE, len(train))

    def loss_on(items: list) -> tuple[torch.Tensor, int]:
        b = collate(items, tokenizer.pad_token_id)
        logp, _ = model_logprobs(engine, b["input_ids"], b["attention_mask"], b["position_ids"])
        # losses.sft_loss without the logits: -Σ m log p(x_t | x_<t) / Σ m over the response tokens
        mask = b["loss_mask"][:, 1:].float()
        return masked_nll(logp, mask), int(mask.sum())

    def train_step(idx: list[int]):
        loss, _ = loss_on([train[i] for i in idx])
        return loss, {}

    @torch.no_grad()
    def evaluate() -> dict:
        engine.eval()
        total_nll, tokens = 0.0, 0.0
        for idx, weights in stages.eval_shards(len(held), cfg.trainer.micro_batch_size):
            real = [held[i] for i, w in zip(idx, weights) if w > 0]
            loss, n = loss_on(real or [held[0]])  # a rank with no samples left still joins the forward
            if real:
                total_nll, tokens = total_nll + loss.item() * n, tokens + n
        return {"eval_loss": stages.weighted_all_sum({"eval_loss": (total_nll, tokens)})["eval_loss"]}

    def export(out: Path) -> None:
        stages.export_model(engine, out, AutoModelForCausalLM, paths["model"], cfg.trainer.lora, TASK_TYPE)

    stages.fit(cfg, engine, len(train), train_step, evaluate if held else None, export,
               config.get("fail_at_step"), config.get("marker"), [stages.sample_tokens(s) for s in train],
               config.get("progress"))


def run_sft(cfg: SFTConfig, llm=None, fail_at_step: int | None = None) -> Path:
    """Run SFT end to end in this process; returns the final HF model directory.

    `llm`: an existing vLLM engine to reuse for the gold evaluation; `fail_at_step`: kill one
    worker once at that step (tests of the resume from checkpoint).
    """
    run = stages.run_stage("sft", cfg, resolve, load_data, train_loop, fail_at_step)
    first_eval = next((h for h in run["history"] if "eval_loss" in h), {})
    run["summary"].update(eval_loss_before=first_eval.get("eval_loss"),
                          eval_loss_after=run["history"][-1].get("eval_loss"))
    stages.add_gold_eval(run, cfg, llm)
    return stages.finish_stage("sft", run)


def main(argv: list[str] | None = None) -> Path:
    return scaffold.main("sft", SFTConfig, run_sft, argv, description=__doc__.split("\n")[0])


if __name__ == "__main__":
    main()
