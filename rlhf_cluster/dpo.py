"""Direct preference optimisation (sigmoid DPO or IPO, optionally with an NLL term on chosen responses
as in RPO / Llama 3: `nll_coef`) as a Ray Train job with DeepSpeed workers.

    python -m rlhf_cluster.dpo [--config configs/dpo-tiny.yaml] [key=value ...]

The reference is the initial policy itself: before the first step (and before any resume
from a checkpoint) each worker computes the reference log-probs of every pair once, so no
frozen copy is held in memory. With no model given it starts from the built-in SFT policy.
Measured on held-out pairs: the chosen-over-rejected log-ratio log π(c) - log π(r) and the
implicit-reward accuracy; with vLLM, the gold score of sampled responses before and after.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlhf_cluster import scaffold, stages
from rlhf_cluster.lib.config import DPOConfig

TASK_TYPE = "CAUSAL_LM"


def resolve(cfg: DPOConfig) -> dict:
    """Model and data paths; the built-in task and SFT policy fill what the config leaves null."""
    from rlhf_cluster.prerequisites import ensure_builtin_sft

    return stages.resolve_paths(cfg, "preferences", lambda assets: ensure_builtin_sft(cfg.builtin))


def load_data(cfg: DPOConfig, paths: dict, tokenizer, log=None):
    return stages.load_train_and_held(cfg, paths, tokenizer, "preferences", log, "pairs")


def pair_logprobs(engine, pairs: list[dict], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π(chosen), log π(rejected)) per pair, summed over response tokens, one forward pass."""
    from rlhf_cluster.lib.data import pad_batch
    from rlhf_cluster.lib.logprobs import model_logprobs

    seqs = [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs]
    ids, att = pad_batch([s.input_ids for s in seqs], pad_id)
    mask, _ = pad_batch([s.loss_mask for s in seqs], 0)
    token_logps, _ = model_logprobs(engine, ids, att)
    logps = (token_logps * mask[:, 1:].float()).sum(-1)  # log π(response | prompt) = Σ_t m_t log p(x_t | x_<t)
    return logps[:len(pairs)], logps[len(pairs):]


@torch.no_grad()
def reference_logprobs(engine, pairs: list[dict], micro: int, pad_id: int) -> torch.Tensor:
    """[N, 2] reference (chosen, rejected) log-probs: each rank scores its share, then one all-reduce."""
    engine.eval()
    out = torch.zeros(len(pairs), 2, dtype=torch.float64)
    for idx, weights in stages.eval_shards(len(pairs), micro):
        c, r = pair_logprobs(engine, [pairs[i] for i in idx], pad_id)
        for j, (i, w) in enumerate(zip(idx, weights)):
            if w > 0:
                out[i] = torch.tensor([c[j].item(), r[j].item()], dtype=torch.float64)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(out)  # each pair was scored by exactly one rank
    return out.float()


def train_loop(config: dict) -> None:
    """One Ray Train worker: the policy's DeepSpeed engine; reference log-probs precomputed."""
    from transformers import AutoModelForCausalLM

    from rlhf_cluster.lib.losses import chosen_nll, dpo_loss, dpo_metrics

    cfg, paths, tokenizer, train, held = stages.start_worker(config, DPOConfig, load_data)
    pad = tokenizer.pad_token_id
    # with LoRA, B starts at zero: the engine's model is still the reference
    engine = stages.stage_engine(cfg, AutoModelForCausalLM, paths["model"], TASK_TYPE, len(train))
    mb = cfg.trainer.micro_batch_size
    ref_train = reference_logprobs(engine, train, mb, pad)  # before fit() restores trained weights
    ref_held = reference_logprobs(engine, held, mb, pad) if held else None

    def train_step(idx: list[int]):
        c, r = pair_logprobs(engine, [train[i] for i in idx], pad)
        ref = ref_train[idx]
        loss = dpo_loss(c, r, ref[:, 0], ref[:, 1], cfg.beta, cfg.loss)
        metrics = dpo_metrics(c.detach(), r.detach(), ref[:, 0], ref[:, 1], cfg.beta)
        if cfg.nll_coef > 0:
            nll = chosen_nll(c, torch.tensor([sum(train[i]["chosen"].loss_mask[1:]) for i in idx]))
            metrics["chosen_nll"] = nll.item()
            loss = loss + cfg.nll_coef * nll
        return loss, metrics

    @torch.no_grad()
    def evaluate() -> dict:
        engine.eval()
        sums = {k: [0.0, 0.0] for k in ("eval_loss", "eval_reward_accuracy", "eval_reward_margin", "eval_logratio",
                                        "eval_chosen_shift", "eval_rejected_shift")}
        for idx, weights in stages.eval_shards(len(held), mb):
            c, r = pair_logprobs(engine, [held[i] for i in idx], pad)
            ref, w = ref_held[idx], torch.tensor(weights)
            h = (c - ref[:, 0]) - (r - ref[:, 1])
            per_pair = {"eval_loss": (torch.nn.functional.softplus(-cfg.beta * h) if cfg.loss == "sigmoid"
                                      else (h - 1 / (2 * cfg.beta)) ** 2),
                        "eval_reward_accuracy": (h > 0).float(), "eval_reward_margin": cfg.beta * h,
                        "eval_logratio": c - r,
                        # log π - log ref of each response: DPO can push both down (likelihood displacement)
                        "eval_chosen_shift": c - ref[:, 0], "eval_rejected_shift": r - ref[:, 1]}
            for key, v in per_pair.items():
                sums[key][0] += float((v * w).sum())
                sums[key][1] += float(w.sum())
        return stages.weighted_all_sum({k: tuple(v) for k, v in sums.items()})

    def export(out: Path) -> None:
        stages.export_model(engine, out, AutoModelForCausalLM, paths["model"], cfg.trainer.lora, TASK_TYPE)

    stages.fit(cfg, engine, len(train), train_step, evaluate if held else None, export,
               config.get("fail_at_step"), config.get("marker"), [stages.sample_tokens(s) for s in train],
               config.get("progress"))


def run_dpo(cfg: DPOConfig, llm=None, fail_at_step: int | None = None) -> Path:
    """Run DPO end to end in this process; returns the final HF model directory.

    `llm`: an existing vLLM engine to reuse for the gold evaluation.
    """
    run = stages.run_stage("dpo", cfg, resolve, load_data, train_loop, fail_at_step)
    first = next((h for h in run["history"] if "eval_logratio" in h), {})
    last = run["history"][-1]
    run["summary"].update(init=run["paths"]["model"], loss=cfg.loss, beta=cfg.beta, nll_coef=cfg.nll_coef,
                          eval_logratio_before=first.get("eval_logratio"),
                          eval_logratio_after=last.get("eval_logratio"),
                          eval_reward_accuracy_after=last.get("eval_reward_accuracy"),
                          eval_reward_margin_after=last.get("eval_reward_margin"),
                          eval_chosen_shift_after=last.get("eval_chosen_shift"),
                          eval_rejected_shift_after=last.get("eval_rejected_shift"))
    stages.add_gold_eval(run, cfg, llm)
    return stages.finish_stage("dpo", run)


def main(argv: list[str] | None = None) -> Path:
    return scaffold.main("dpo", DPOConfig, run_dpo, argv, description=__doc__.split("\n")[0])


if __name__ == "__main__":
    main()
