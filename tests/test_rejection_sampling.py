"""Rejection sampling on the built-in task: gold improvement, best-of-K, rounds with promotion."""

from __future__ import annotations

import json

import pytest

from rlhf_cluster.lib.config import CONFIG_DIR, ConfigError, RSConfig, load_config
from rlhf_cluster.rejection_sampling import run


def _rounds_config(builtin_cfg, builtin_sft_rm, out):
    """RS, RS, PPO from the built-in SFT policy, one run (each round costs a minute here)."""
    sft, rm = builtin_sft_rm
    return load_config(RSConfig, CONFIG_DIR / "rejection-sampling-tiny.yaml", [
        f"policy.path={sft}", f"reward.path={rm}", f"output_dir={out}", f"registry={out / 'registry'}",
        f"builtin.cache_dir={builtin_cfg.cache_dir}", "rounds=[rejection_sampling, rejection_sampling, ppo]",
        "rs.prompts_per_round=64", "iterations=4", "eval_every=2", "checkpoint_every=2", "keep_checkpoints=1",
        "best_of_k_eval=[1,4,8]", "best_of_k_seeds=3"])


def _chosen(out, summary) -> dict:
    """What the rounds chose: the promoted round, the PPO round's kept checkpoints, the registry's serving step."""
    from rlhf_cluster.lib.registry import open_registry

    kept = sorted(p.name for p in (out / "round_3" / "checkpoints").iterdir())
    return {"best_round": summary["best_round"], "kept": kept, "serving": open_registry(out / "registry").serving(
        "policy").step}


@pytest.fixture(scope="module")
def rounds_run(builtin_cfg, builtin_sft_rm, tmp_path_factory):
    out = tmp_path_factory.mktemp("rs")
    return out, run(_rounds_config(builtin_cfg, builtin_sft_rm, out))


@pytest.mark.long
@pytest.mark.ray
@pytest.mark.slow
def test_rounds_improve_gold_promote_the_best_and_best_of_k_grows(rounds_run):
    from rlhf_cluster.lib.registry import open_registry

    out, summary = rounds_run
    gold = summary["gold_per_round"]  # on the test split (46 prompts: one standard error is ~0.05)
    assert len(gold) == 4
    # Margins against the seed spread measured by the results harness (docs/results.md, 3 seeds): two rounds of
    # best-of-8 fine-tuning on 64 prompts each gain +0.13 test gold with a seed std of 0.055, so two rounds must
    # beat the SFT policy by 0.02 (two std below the mean gain); RS followed by PPO gains +0.14 with std 0.024, so
    # after the PPO round the margin is 0.08. Measured, seed 0: 0.673 -> 0.703 -> 0.777 -> 0.797 on one machine,
    # 0.669 -> 0.721 -> 0.742 -> 0.840 on another (the built-in SFT policy differs in the last digits).
    assert gold[2] > gold[0] + 0.02 and gold[3] > gold[0] + 0.08, gold
    best, val = summary["best_round"], summary["val_gold_per_round"]
    assert summary["reported_split"] == "test" and summary["promote_by"] == "val_gold"
    assert best == max(range(4), key=lambda i: val[i]) and val[best] >= val[1]  # promotion by validation gold
    assert open_registry(out / "registry").serving("policy").step == best

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("round") for r in rows] == [None, "rejection_sampling", "rejection_sampling", "ppo"]
    selected = [json.loads(line) for line in (out / "round_1" / "selected.jsonl").read_text().splitlines()]
    assert 0 < len(selected) <= 64 and {"messages", "reward"} <= set(selected[0])
    assert selected[0]["messages"][-1]["role"] == "assistant"
    assert (out / "round_3" / "checkpoints").is_dir() and (out / "report.png").exists()

    curve = {int(k): v for k, v in summary["best_of_k_gold"].items()}
    # best-of-K of the SFT policy: the reward model's pick of K samples beats one sample
    # (averaged over 3 seeds); the RM is imperfect, so K=8 need not beat K=4 (over-optimisation)
    assert curve[4] > curve[1] + 0.03 and curve[8] > curve[1], curve


def test_bad_rounds_config_fails_early():
    with pytest.raises(ConfigError, match="rounds must name at least one round"):
        load_config(RSConfig, None, ["rounds=[]"])
    with pytest.raises(ConfigError, match="rounds"):
        load_config(RSConfig, None, ["rounds=[sft]"])
    with pytest.raises(ConfigError, match="combine=llama2 needs reward_models named"):
        load_config(RSConfig, None, ["combine=llama2"])


@pytest.mark.long
@pytest.mark.ray
@pytest.mark.slow
def test_test_split_gold_cannot_change_what_is_promoted_or_kept(rounds_run, builtin_cfg, builtin_sft_rm, tmp_path,
                                                                monkeypatch):
    """The RS, RS, PPO rounds again, with the test split's gold labels inverted (in the driver, where every gold
    score is computed): the same round is promoted, the registry serves the same step and the PPO round keeps the
    same checkpoints (chosen by validation gold every 2 iterations); only the reported test numbers differ."""
    from rlhf_cluster.lib import task

    test_prompts = set(task.split_prompts(builtin_cfg.seed)["test"])
    true_gold = task.gold_score

    def inverted_on_test(prompt, response):
        g = true_gold(prompt, response)
        return task.GoldScore(1 - g.helpfulness, 1 - g.safety) if prompt in test_prompts else g

    monkeypatch.setattr(task, "gold_score", inverted_on_test)
    out = tmp_path / "flipped"
    flipped = run(_rounds_config(builtin_cfg, builtin_sft_rm, out))
    monkeypatch.setattr(task, "gold_score", true_gold)
    clean_out, clean = rounds_run
    assert flipped["gold_per_round"] != clean["gold_per_round"]  # the test labels did change
    assert flipped["val_gold_per_round"] == pytest.approx(clean["val_gold_per_round"], abs=1e-9)
    assert _chosen(out, flipped) == _chosen(clean_out, clean)
