"""Reward model training (Bradley–Terry, Llama 2 margin, Llama 3 ranking) as a Ray Train job.

    python -m rlhf_cluster.reward [--config configs/reward-tiny.yaml] [key=value ...]

A sequence classifier with one output scores prompt + response at its last token. With no
model given it starts from the built-in untrained `reward_base` (`builtin_init: reward_base`,
the default: it measured better on the built-in task, see docs/stages.md) or from the built-in
SFT policy's backbone (`builtin_init: sft`: the cached one that a PPO job or the pipeline trained first). Measured on
held-out pairs with gold labels: pairwise accuracy, before and after training.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlhf_cluster import scaffold, stages
from rlhf_cluster.lib.config import ConfigError, RewardConfig
from rlhf_cluster.lib.data import DataError

TASK_TYPE = "SEQ_CLS"


def resolve(cfg: RewardConfig) -> dict:
    """Model and data paths; the built-in task fills what the config leaves null (the aspect's
    preference pairs; the model `builtin_init` names)."""
    def builtin_model(assets):
        if cfg.builtin_init == "reward_base":
            return assets.reward_base
        from rlhf_cluster.lib.builtin import builtin_model_dir

        sft = builtin_model_dir(cfg.builtin, "sft")
        if not (sft / "config.json").exists():  # a job runs no other job: the SFT stage comes first
            raise ConfigError(f"builtin_init: sft starts from the built-in SFT policy, which is not trained yet "
                              f"({sft}): set model.path to an SFT policy (`python -m rlhf_cluster.sft` writes one "
                              "to <output_dir>/model), or run the pipeline, whose reward stage starts from its own")
        return sft

    prefix = "preferences" if cfg.aspect == "overall" else f"preferences_{cfg.aspect}"
    return stages.resolve_paths(cfg, prefix, builtin_model)


def load_data(cfg: RewardConfig, paths: dict, tokenizer, log=None):
    train, held, report = stages.load_train_and_held(cfg, paths, tokenizer, "preferences", log, "pairs")
    if cfg.loss == "margin":
        unknown = sorted({str(p["strength"]) for p in train if p["strength"] not in cfg.margins})
        if unknown:
            raise DataError(f"{paths['train']}: loss=margin needs a 'strength' that is a key of margins "
                            f"{sorted(cfg.margins)}; found {unknown}")
    if log and cfg.loss == "ranking":
        log(f"ranking: {sum('edited' in p for p in train)} of {len(train)} pairs have an edited response")
    return train, held, report


def score(engine, pairs: list[dict], keys: tuple[str, ...], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards [B, len(keys)] of each pair's responses (best first), all in one forward pass, and
    a [B, len(keys)] mask of which responses exist (a pair may lack `edited`)."""
    from rlhf_cluster.lib.data import pad_batch

    seqs, where = [], []
    for b, pair in enumerate(pairs):
        for k, key in enumerate(keys):
            if key in pair:
                seqs.append(pair[key].input_ids)
                where.append((b, k))
    ids, att = pad_batch(seqs, pad_id)
    out = engine(input_ids=ids, attention_mask=att).logits.squeeze(-1).float()
    rewards = torch.zeros(len(pairs), len(keys))
    present = torch.zeros(len(pairs), len(keys))
    rows, cols = zip(*where)
    rewards = rewards.index_put((torch.tensor(rows), torch.tensor(cols)), out)
    present[list(rows), list(cols)] = 1.0
    return rewards, present


def train_loop(config: dict) -> None:
    """One Ray Train worker: a DeepSpeed engine on the reward model, trained by the shared loop."""
    from transformers import AutoModelForSequenceClassification

    from rlhf_cluster.lib.losses import bradley_terry_loss, margin_loss, ranking_loss, reward_metrics

    cfg, paths, tokenizer, train, held = stages.start_worker(config, RewardConfig, load_data)
    # pad_token_id: the score is read at the last non-pad token
    engine = stages.stage_engine(cfg, AutoModelForSequenceClassification, paths["model"], TASK_TYPE, len(train),
                                 num_labels=1, pad_token_id=tokenizer.pad_token_id)
    keys = ("edited", "chosen", "rejected") if cfg.loss == "ranking" else ("chosen", "rejected")
    c, r = keys.index("chosen"), keys.index("rejected")

    def train_step(idx: list[int]):
        pairs = [train[i] for i in idx]
        rewards, present = score(engine, pairs, keys, tokenizer.pad_token_id)
        if cfg.loss == "bradley_terry":
            loss = bradley_terry_loss(rewards[:, c], rewards[:, r])
        elif cfg.loss == "margin":
            m = torch.tensor([cfg.margins[p["strength"]] for p in pairs])
            loss = margin_loss(rewards[:, c], rewards[:, r], m)
        else:
            loss = ranking_loss(rewards, present)
        return loss, reward_metrics(rewards[:, c].detach(), rewards[:, r].detach())

    @torch.no_grad()
    def evaluate() -> dict:
        engine.eval()
        sums = {"eval_loss": [0.0, 0.0], "eval_accuracy": [0.0, 0.0], "eval_margin": [0.0, 0.0]}
        for idx, weights in stages.eval_shards(len(held), cfg.trainer.micro_batch_size):
            rewards, _ = score(engine, [held[i] for i in idx], ("chosen", "rejected"), tokenizer.pad_token_id)
            w = torch.tensor(weights)
            diff = rewards[:, 0] - rewards[:, 1]
            for key, per_pair in (("eval_loss", torch.nn.functional.softplus(-diff)),
                                  ("eval_accuracy", (diff > 0).float()), ("eval_margin", diff)):
                sums[key][0] += float((per_pair * w).sum())
                sums[key][1] += float(w.sum())
        return stages.weighted_all_sum({k: tuple(v) for k, v in sums.items()})

    def export(out: Path) -> None:
        stages.export_model(engine, out, AutoModelForSequenceClassification, paths["model"], cfg.trainer.lora,
                            TASK_TYPE, {"num_labels": 1})

    stages.fit(cfg, engine, len(train), train_step, evaluate if held else None, export,
               config.get("fail_at_step"), config.get("marker"), [stages.sample_tokens(s) for s in train],
               config.get("progress"))


def run_reward(cfg: RewardConfig, fail_at_step: int | None = None) -> Path:
    """Train a reward model end to end in this process; returns the final HF model directory."""
    run = stages.run_stage("reward", cfg, resolve, load_data, train_loop, fail_at_step)
    history = run["history"]
    first = next((h for h in history if "eval_accuracy" in h), {})
    run["summary"].update(init=run["paths"]["model"], loss=cfg.loss,
                          eval_accuracy_before=first.get("eval_accuracy"),
                          eval_accuracy_after=history[-1].get("eval_accuracy"),
                          eval_loss_after=history[-1].get("eval_loss"))
    return stages.finish_stage("reward", run)


def main(argv: list[str] | None = None) -> Path:
    return scaffold.main("reward", RewardConfig, run_reward, argv, description=__doc__.split("\n")[0])


if __name__ == "__main__":
    main()
