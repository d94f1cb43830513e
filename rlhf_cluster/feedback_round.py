"""A feedback round: train the next version on what people said about the served one (the seeds' loop).

    python -m rlhf_cluster.feedback_round [--config configs/feedback-round-tiny.yaml] [key=value ...]

    1. feedback   the records the feedback app stored since the last round's cursor -> preference pairs
                  (rlhf_cluster/lib/feedback.py: comparisons, edits, ratings, safety flags); too few: no round
    2. split      by prompt: heldout_fraction of the prompts measure the reward models, the rest train
    3. reward     the served reward model (registry; else the built-in one) continued on the new pairs plus
                  replay_ratio x as many earlier pairs (at least a global batch in all); accuracy on the held-out
                  feedback before and after;
                  registered and promoted (the reward app follows)
    4. policy     `rl.rounds` (rejection sampling / PPO) from the served policy, scored by the new reward model;
                  the best by validation is registered and promoted (the policy app loads, probes, swaps it in)
    5. book       output_dir/rounds.json (written atomically, last): each round and the cursor the next starts
                  from, so a round that fails takes the same feedback again

Every round writes output_dir/round_<n>/: data/ (the pairs it trained and measured on), reward/, rl/ (with its
report.png), summary.json. One round at a time per output_dir (a file lock). The last line printed is the summary
as JSON after ROUND_SUMMARY_LINE: the feedback app, which submits rounds as Ray jobs (POST /v1/feedback/rounds), reads
it from the job's logs, and $RLHF_FEEDBACK_ROUND_ID (the job's id) is recorded in it and in rounds.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from pathlib import Path

from rlhf_cluster import scaffold
from rlhf_cluster.lib import files
from rlhf_cluster.lib.config import CONFIG_DIR, FeedbackRoundConfig, RewardConfig, RSConfig
from rlhf_cluster.lib.feedback import ROUND_ID_ENV, ROUND_SUMMARY_LINE
from rlhf_cluster.stages import global_batch

DEFAULT_CONFIG = CONFIG_DIR / "feedback-round-tiny.yaml"


def split_by_prompt(rows: list[dict], heldout_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, heldout): whole prompts go to one side, chosen by a hash of prompt and seed (stable as feedback
    grows); at least one prompt on each side when there are two or more."""
    def key(row):
        return hashlib.sha256(f"{seed}:{json.dumps(row['prompt'], sort_keys=True)}".encode()).hexdigest()

    prompts = sorted({key(r) for r in rows})
    n_held = min(max(1, round(heldout_fraction * len(prompts))), len(prompts) - 1) if len(prompts) > 1 else 0
    held = set(prompts[:n_held])
    return [r for r in rows if key(r) not in held], [r for r in rows if key(r) in held]


def replay_rows(cfg: FeedbackRoundConfig, n: int) -> list[dict]:
    """n earlier pairs (seeded draw) from `replay`, or the built-in task's training pairs of the reward's aspect."""
    if n <= 0:
        return []
    if cfg.replay:
        path = Path(cfg.replay)
    else:
        from rlhf_cluster.lib.builtin import ensure_builtin

        aspect = cfg.reward.aspect
        path = ensure_builtin(cfg.builtin).file("preferences_train.jsonl" if aspect == "overall"
                                                else f"preferences_{aspect}_train.jsonl")
    from rlhf_cluster.lib.data import load_records

    rows = [dict(r) for r in load_records(path)]
    return random.Random(cfg.seed).sample(rows, min(n, len(rows)))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = ("prompt", "chosen", "rejected", "strength", "edited")  # one shape for feedback and replay rows
    path.write_text("".join(json.dumps({k: r.get(k) for k in keys}) + "\n" for r in rows))
    return path


def served(registry, kind: str, builtin_cfg) -> tuple[str, str | None]:
    """(path, entry id) of the registry's served model of `kind`, else the built-in trained one."""
    entry = registry.serving(kind)
    if entry is not None:
        return entry.path, entry.id
    from rlhf_cluster.prerequisites import ensure_builtin_rm, ensure_builtin_sft

    return str(ensure_builtin_rm(builtin_cfg) if kind == "reward" else ensure_builtin_sft(builtin_cfg)), None


def run(cfg: FeedbackRoundConfig, log=print) -> dict:
    from rlhf_cluster.lib.builtin import locked

    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    with locked(out / "rounds.lock"):  # two rounds at once would train on the same feedback
        summary = _round(cfg, out, log)
    log(ROUND_SUMMARY_LINE + json.dumps(summary))
    return summary


def _round(cfg: FeedbackRoundConfig, out: Path, log) -> dict:
    from rlhf_cluster import rejection_sampling
    from rlhf_cluster.lib.feedback import open_feedback_store, preference_rows, read_all
    from rlhf_cluster.lib.registry import make_entry, open_registry
    from rlhf_cluster.pipeline import shared
    from rlhf_cluster.reward import run_reward

    t0 = time.time()
    book_path = out / "rounds.json"
    book = json.loads(book_path.read_text()) if book_path.exists() else {"cursor": None, "rounds": []}
    store = open_feedback_store(cfg.feedback)
    records = read_all(store, book["cursor"])
    rows = preference_rows(records, None if cfg.reward.aspect == "overall" else cfg.reward.aspect)
    number = len(book["rounds"]) + 1
    log(f"feedback round {number}: {len(records)} new records in {store.describe()} -> {len(rows)} preference pairs")
    if len(rows) < cfg.min_pairs:
        log(f"fewer than min_pairs={cfg.min_pairs} new pairs: no round (the feedback waits for the next one)")
        return {"id": os.environ.get(ROUND_ID_ENV), "ran": False, "round": number, "records": len(records),
                "pairs": len(rows)}

    where = out / f"round_{number}"
    train, heldout = split_by_prompt(rows, cfg.heldout_fraction, cfg.seed)
    # replay_ratio x as many earlier pairs, and at least enough to fill one of the reward trainer's global batches
    replay = replay_rows(cfg, max(round(cfg.replay_ratio * len(train)), global_batch(cfg.reward) - len(train)))
    data = {"train": write_jsonl(where / "data" / "train.jsonl", train + replay),
            "heldout": write_jsonl(where / "data" / "heldout_feedback.jsonl", heldout) if heldout else None}
    log(f"pairs: {len(train)} new to train on + {len(replay)} replayed, {len(heldout)} held out")

    registry = open_registry(cfg.registry)
    reward_path, reward_from = (cfg.reward.model.path, None) if cfg.reward.model.path else \
        served(registry, "reward", cfg.builtin)
    rm_fields = cfg.reward.model_dump()
    rm_cfg = RewardConfig.model_validate({
        **rm_fields, **shared(cfg, f"{where.name}/reward"),
        "model": {**rm_fields["model"], "path": reward_path},
        # no held-out feedback (feedback on one prompt): the reward stage measures on its default validation pairs
        "data": {**rm_fields["data"], "train": str(data["train"]),
                 "eval": str(data["heldout"]) if heldout else None}})
    log(f"reward model: continuing {reward_from or reward_path} on the round's pairs")
    rm_dir = run_reward(rm_cfg)
    rm_summary = json.loads((rm_dir.parent / "summary.json").read_text())
    accuracy = {"before": rm_summary.get("eval_accuracy_before"), "after": rm_summary.get("eval_accuracy_after")} \
        if heldout else {"before": None, "after": None}
    run_name = f"feedback-round-{number}"
    rm_entry = registry.register(make_entry(rm_dir, run=run_name, kind="reward", stage="reward", step=number,
                                            metrics={f"heldout_feedback_accuracy_{k}": v
                                                     for k, v in accuracy.items() if v is not None}))
    registry.promote(rm_entry.id)
    log(f"reward model {rm_entry.id}: accuracy on held-out feedback {accuracy['before']} -> {accuracy['after']}; "
        "promoted")

    policy_path, policy_from = served(registry, "policy", cfg.builtin)
    rl_fields = cfg.rl.model_dump()
    rs_cfg = RSConfig.model_validate({**rl_fields, **shared(cfg, f"{where.name}/rl"), "registry": cfg.registry,
                                      "policy": {**rl_fields["policy"], "path": policy_path},
                                      "reward": {**rl_fields["reward"], "path": str(rm_dir)}})
    log(f"policy: rounds {cfg.rl.rounds} from {policy_from or policy_path}")
    rl = rejection_sampling.run(rs_cfg, log=log, run_name=run_name)

    summary = {"id": os.environ.get(ROUND_ID_ENV), "ran": True, "round": number, "records": len(records),
               "pairs": len(rows), "pairs_train": len(train), "pairs_replayed": len(replay),
               "pairs_heldout": len(heldout),
               "reward_from": reward_from or reward_path, "reward_entry": rm_entry.id,
               "heldout_feedback_accuracy": accuracy, "policy_from": policy_from or policy_path,
               "policy_entry": rl["best_entry"], "best_round": rl["best_round"],
               f"{rl['reported_split']}_gold_per_round": rl["gold_per_round"],
               "val_gold_per_round": rl["val_gold_per_round"], "report": rl["report"],
               "cursor": records[-1]["cursor"], "seconds": round(time.time() - t0, 1)}
    files.write_json(where / "summary.json", summary, durable=True)
    book["rounds"].append({k: summary[k] for k in ("id", "round", "records", "pairs", "reward_entry", "policy_entry",
                                                    "heldout_feedback_accuracy", "cursor")})
    book["cursor"] = summary["cursor"]
    # last: a round that failed before here takes the same feedback again
    files.write_json(book_path, book, durable=True)
    log(f"\n=== feedback round {number} ===\n{len(rows)} pairs from {len(records)} records; reward model accuracy "
        f"on held-out feedback {accuracy['before']} -> {accuracy['after']}; policy {rl['best_entry']} promoted "
        f"(best round {rl['best_round']}, {rl['reported_split']} gold {rl['gold_per_round']}); "
        f"report: {rl['report']}")
    return summary


def main(argv: list[str] | None = None) -> dict:
    return scaffold.main("feedback_round", FeedbackRoundConfig, run, argv, DEFAULT_CONFIG, __doc__.split("\n")[0])


if __name__ == "__main__":
    main()
