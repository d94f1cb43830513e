"""Actor groups on a real local Ray cluster: DeepSpeed ZeRO-3 trainer, vLLM engine, weight sync."""

from __future__ import annotations

import pytest
import ray
import torch

from rlhf_cluster.actors.group import (
    ActorGroup,
    Worker,
    colocated_bundle,
    colocated_placement_group,
    gather,
    split_evenly,
)
from rlhf_cluster.actors.rollout import RolloutEngine
from rlhf_cluster.actors.scorers import ReferenceModel, RewardModel
from rlhf_cluster.actors.trainer import Critic, PolicyTrainer
from rlhf_cluster.lib.config import GroupResources, RolloutConfig, TrainerConfig
from rlhf_cluster.lib.data import encode_prompt, load_tokenized
from tests.workers import PortTakenOnce, parameter_elements

pytestmark = pytest.mark.ray

TRAINER = TrainerConfig(num_ranks=2, num_cpus_per_rank=0.5, micro_batch_size=8, zero_stage=3)
ROLLOUT = RolloutConfig(max_new_tokens=12, samples_per_prompt=2, temperature=1.0)
PROMPTS = ["List 3 fruits.", "Count from 2 to 6.", "Repeat the word sun 3 times.", "Insult the nurse.", "List 2 tools."]


def test_split_evenly():
    assert split_evenly(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert split_evenly([1], 2) == [[1], []]


def test_colocated_bundle_sums_per_rank_requests():
    a = GroupResources(num_ranks=2, num_cpus_per_rank=0.5, num_gpus_per_rank=0.5)
    b = GroupResources(num_ranks=2, num_cpus_per_rank=0.25, num_gpus_per_rank=0.25)
    assert colocated_bundle({"trainer": a, "reference": b}) == {"CPU": 0.75, "GPU": 0.75}
    assert colocated_bundle({"critic": GroupResources(num_cpus_per_rank=0.25),
                             "reward_group": GroupResources(num_cpus_per_rank=0.25)}) == {"CPU": 0.5}


def test_colocated_groups_share_bundles(ray_cluster):
    """Rank i of each colocated group lands in bundle i of one placement group; a group's shutdown
    or restart leaves the shared placement group alone (its owner removes it)."""
    from ray.util.placement_group import placement_group_table, remove_placement_group

    res = GroupResources(num_ranks=2, num_cpus_per_rank=0.1)
    pg = colocated_placement_group({"a": res, "b": res})
    try:
        a = ActorGroup(Worker, res, name="a", pg=pg)
        b = ActorGroup(Worker, res, name="b", pg=pg)
        where = [a.run("placement"), b.run("placement")]
        assert {w["placement_group"] for group in where for w in group} == {pg.id.hex()}
        assert placement_group_table(pg)["bundles"] == {0: {"CPU": 0.2}, 1: {"CPU": 0.2}}
        b.restart()  # in place, in the same bundles
        assert {w["placement_group"] for w in b.run("placement")} == {pg.id.hex()}
        a.shutdown()
        b.shutdown()
        assert placement_group_table(pg)["state"] == "CREATED"
    finally:
        remove_placement_group(pg)


@pytest.mark.long
def test_a_group_whose_port_was_taken_starts_again_on_another(ray_cluster, tmp_path):
    """EADDRINUSE from rank 0's rendezvous restarts the group on a new port (the make test run of
    2026-12-04 lost a critic group, and with it every later PPO test, to such a race); two groups of one name
    get distinct placement groups, so a group another run left behind cannot refuse a new one."""
    from ray.util.placement_group import placement_group_table

    res = GroupResources(num_ranks=1, num_cpus_per_rank=0.1)
    group = ActorGroup(PortTakenOnce, res, str(tmp_path / "taken"), name="port")
    try:
        assert (tmp_path / "taken").exists() and group._starts == 2
        assert group.run("ping") == [0]
        other = ActorGroup(Worker, res, name="port")
        assert placement_group_table(other.pg)["name"] != placement_group_table(group.pg)["name"]
        other.shutdown()
    finally:
        group.shutdown()


@pytest.fixture(scope="module")
def policy(ray_cluster, builtin_assets):
    group = ActorGroup(PolicyTrainer, TRAINER, str(builtin_assets.base), TRAINER.model_dump(), 1000, name="policy")
    yield group
    group.shutdown()


@pytest.fixture(scope="module")
def engine(ray_cluster, builtin_assets):
    group = ActorGroup(RolloutEngine, GroupResources(num_cpus_per_rank=0.5), str(builtin_assets.base),
                       ROLLOUT.model_dump(), name="rollout")
    yield group
    group.shutdown()


@pytest.fixture(scope="module")
def sft_items(tokenizer, builtin_assets):
    samples, _ = load_tokenized(builtin_assets.file("sft_train.jsonl"), tokenizer, "sft", 128)
    return [{"input_ids": s.input_ids, "loss_mask": s.loss_mask[1:]} for s in samples[:16]]


def _prompt_ids(tokenizer):
    return [encode_prompt(tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]


def _items(samples):
    """Trainer items from engine samples: loss mask on the response positions."""
    return [{"input_ids": s["prompt_ids"] + s["response_ids"],
             "loss_mask": [0] * (len(s["prompt_ids"]) - 1) + [1] * len(s["response_ids"])} for s in samples]


def _response_logprobs(policy, samples):
    lps = policy.map("logprobs", _items(samples))
    return [lp[len(s["prompt_ids"]) - 1:] for lp, s in zip(lps, samples)]


def _max_gap(samples, logprobs):
    return max(abs(a - b) for s, lp in zip(samples, logprobs) for a, b in zip(s["logprobs"], lp))


def engine_model_path(engine) -> str:
    return ray.get(engine.actors[0].model_path.remote())


def test_generation_shapes(engine, tokenizer):
    samples = ray.get(engine.actors[0].generate.remote(_prompt_ids(tokenizer)))
    assert len(samples) == 2 * len(PROMPTS)
    assert [s["prompt_index"] for s in samples] == [i for i in range(len(PROMPTS)) for _ in range(2)]
    for s in samples:
        assert 1 <= len(s["response_ids"]) <= ROLLOUT.max_new_tokens
        assert len(s["logprobs"]) == len(s["response_ids"]) and all(lp <= 0 for lp in s["logprobs"])
        if s["finished"]:
            assert s["response_ids"][-1] == tokenizer.eos_token_id  # the end-of-turn token is kept


def test_zero3_trains_syncs_and_logprobs_agree(policy, engine, tokenizer, sft_items):
    """vLLM and the ZeRO-3 trainer agree on log-probs; after an update and a sync they agree
    with the *updated* trainer and no longer with the old weights."""
    prompts = _prompt_ids(tokenizer)
    before = ray.get(engine.actors[0].generate.remote(prompts))
    assert _max_gap(before, _response_logprobs(policy, before)) < 1e-3

    losses = [sum(m["loss"] for m in ray.get(policy.split_call("train_step", sft_items, "sft"))) / 2
              for _ in range(6)]
    assert losses[-1] < losses[0] - 0.2, losses  # loss falls on a fixed batch

    trained = _response_logprobs(policy, before)
    stale_gap = _max_gap(before, trained)
    assert stale_gap > 1e-2  # the engine still holds the old weights

    buckets = [ref for part in policy.run("export_weights", 1 << 16) for ref in part]
    assert len(buckets) > 1  # small buckets: several transfers, not one call per parameter
    loaded = ray.get(engine.actors[0].update_weights.remote(buckets, 1))
    assert loaded == 39  # every tensor of the tiny Llama (4 layers x 9 + embed, norm, head)

    # every parameter moved: per-layer checksums equal on both sides
    trainer_sums = policy.run("checksum")[0]
    engine_sums = ray.get(engine.actors[0].checksum.remote())
    assert trainer_sums.keys() == engine_sums.keys()
    for k in trainer_sums:
        assert trainer_sums[k] == pytest.approx(engine_sums[k], rel=1e-9, abs=1e-9), k

    after = ray.get(engine.actors[0].generate.remote(prompts))
    assert _max_gap(after, _response_logprobs(policy, after)) < 1e-3
    # ...and no longer with the old (base) weights
    from transformers import AutoModelForCausalLM

    from rlhf_cluster.lib.algorithms import sequence_token_logprobs

    old = AutoModelForCausalLM.from_pretrained(engine_model_path(engine)).eval()
    with torch.no_grad():
        old_lps = []
        for s in after:
            ids = torch.tensor([s["prompt_ids"] + s["response_ids"]])
            lp = sequence_token_logprobs(old, ids, torch.ones_like(ids))[0]
            old_lps.append(lp[len(s["prompt_ids"]) - 1:].tolist())
    assert _max_gap(after, old_lps) > 1e-2


def test_save_load_restores_logprobs(policy, sft_items, tmp_path):
    saved = policy.map("logprobs", sft_items)
    policy.run("save", str(tmp_path / "ckpt"))
    ray.get(policy.split_call("train_step", sft_items, "sft"))
    changed = policy.map("logprobs", sft_items)
    assert max(abs(a - b) for x, y in zip(saved, changed) for a, b in zip(x, y)) > 1e-3
    policy.run("load", str(tmp_path / "ckpt"))
    restored = policy.map("logprobs", sft_items)
    assert restored == saved  # identical, bit for bit


def test_one_optimizer_step_per_call_however_many_micro_batches(policy, sft_items, tmp_path):
    """A PPO mini-batch is one optimiser step: its micro-batches' gradients add up (loss / n each)."""
    items = sft_items + sft_items  # 16 per rank: 2 micro-batches of 8
    policy.run("save", str(tmp_path / "ckpt"))
    before = policy.map("logprobs", sft_items)
    for m in ray.get(policy.split_call("train_step", items, "sft")):
        assert m["optimizer_steps"] == 1 and m["micro_batches"] == 2 and m["items"] == 16
    once = policy.map("logprobs", sft_items)
    # the same items as one micro-batch of 8 per rank (each item twice over 2 micro-batches above):
    # the same gradient, so the same step
    policy.run("load", str(tmp_path / "ckpt"))
    assert policy.map("logprobs", sft_items) == before
    for m in ray.get(policy.split_call("train_step", sft_items, "sft")):
        assert m["optimizer_steps"] == 1 and m["micro_batches"] == 1
    single = policy.map("logprobs", sft_items)
    gap = max(abs(a - b) for x, y in zip(once, single) for a, b in zip(x, y))
    moved = max(abs(a - b) for x, y in zip(before, single) for a, b in zip(x, y))
    assert gap < 1e-4 < 1e-2 < moved, (gap, moved)


def test_bad_input_gives_clear_errors_and_actors_survive(policy, engine, tokenizer, sft_items):
    gen = engine.actors[0].generate
    with pytest.raises(ray.exceptions.RayTaskError, match="empty prompt list"):
        ray.get(gen.remote([]))
    with pytest.raises(ray.exceptions.RayTaskError, match="engine's context is 256"):
        ray.get(gen.remote([[5] * 300]))
    with pytest.raises(ray.exceptions.RayTaskError, match="samples_per_prompt"):
        ray.get(gen.remote(_prompt_ids(tokenizer)[:1], {"samples_per_prompt": 0}))
    # NaN advantages on rank 1's half only: both ranks skip (and count) the micro-batch, no deadlock
    ppo_items = [dict(it, old_logprobs=[0.0] * len(it["loss_mask"]),
                      advantages=[float("nan") if i >= 2 else 1.0] * len(it["loss_mask"]))
                 for i, it in enumerate(sft_items[:4])]
    before = policy.map("logprobs", sft_items[:4])
    for m in ray.get(policy.split_call("train_step", ppo_items, "ppo")):
        assert m["skipped_micro_batches"] == 1 and m["items"] == 0
    assert policy.map("logprobs", sft_items[:4]) == before  # weights untouched
    # a finite loss whose gradient overflows (on rank 0 only): the ZeRO-3 optimiser skips the step
    # on every rank, and it is counted
    ray.get(policy.actors[0].inject_nonfinite_gradient.remote(1))
    for m in ray.get(policy.split_call("train_step", sft_items[:4], "sft")):
        assert m["skipped_micro_batches"] == 0 and m["skipped_optimizer_steps"] == 1  # one step per call
    assert policy.map("logprobs", sft_items[:4]) == before
    assert policy.run("weights_finite") == [True, True]
    with pytest.raises(ray.exceptions.RayTaskError, match="unknown loss 'dpo2'"):
        ray.get(policy.split_call("train_step", sft_items[:4], "dpo2"))
    assert policy.run("ping") == [0, 1] and ray.get(engine.actors[0].ping.remote()) == 0  # alive
    assert len(ray.get(gen.remote(_prompt_ids(tokenizer)[:1]))) == 2  # and still working


def test_reference_and_reward_groups_match_direct_calls(ray_cluster, builtin_assets, tokenizer, sft_items):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from rlhf_cluster.lib.algorithms import sequence_token_logprobs
    from rlhf_cluster.lib.data import pad_batch

    res = GroupResources(num_ranks=2, num_cpus_per_rank=0.25)
    ref = ActorGroup(ReferenceModel, res, str(builtin_assets.base), name="reference")
    rm = ActorGroup(RewardModel, res, str(builtin_assets.reward_base), name="reward")
    try:
        seqs = [it["input_ids"] for it in sft_items[:6]]
        ref_lp = ref.map("logprobs", seqs)
        scores = rm.map("score", seqs)
        base = AutoModelForCausalLM.from_pretrained(builtin_assets.base).eval()
        head = AutoModelForSequenceClassification.from_pretrained(builtin_assets.reward_base).eval()
        with torch.no_grad():
            for s, lp, score in zip(seqs, ref_lp, scores):
                ids = torch.tensor([s])
                direct = sequence_token_logprobs(base, ids, torch.ones_like(ids))[0]
                torch.testing.assert_close(torch.tensor(lp), direct)
                assert score == pytest.approx(head(input_ids=ids).logits[0, 0].item(), abs=1e-5)
            # padding in a batch does not change a score (read at the last real token)
            ids, att = pad_batch(seqs, tokenizer.pad_token_id)
            torch.testing.assert_close(head(input_ids=ids, attention_mask=att).logits[:, 0],
                                       torch.tensor(scores), atol=1e-5, rtol=0)
        # packed rows (mixed lengths: short ones share a row) give the padded results, to 1e-5 in fp32
        mixed = seqs + [s[: len(s) // 3] for s in seqs]
        padded = ref.map("logprobs", mixed), rm.map("score", mixed)
        for group in (ref, rm):
            group.run("set_micro_batching", 16, 512)
        packed = ref.map("logprobs", mixed), rm.map("score", mixed)
        assert max(abs(a - b) for x, y in zip(padded[0], packed[0]) for a, b in zip(x, y, strict=True)) < 1e-5
        assert max(abs(a - b) for a, b in zip(padded[1], packed[1], strict=True)) < 1e-5
    finally:
        ref.shutdown()
        rm.shutdown()


def test_partitioned_reference_and_reward_equal_full_copies(ray_cluster, builtin_assets, sft_items):
    """ZeRO-3 inference (`reference.partition`, `reward_group.partition`): two ranks, each holding half of the
    parameters, give the full copies' log-probs and scores to 1e-5 in fp32: with uneven shares (in micro-batches
    of 2, rank 0 has two forward passes and rank 1 one, plus a filler to keep in step), packed rows, the shards
    offloaded to host memory, and the rollout producer's chained call (every rank gets every engine's samples)."""
    res = GroupResources(num_ranks=2, num_cpus_per_rank=0.25)
    base, reward_base = str(builtin_assets.base), str(builtin_assets.reward_base)
    groups = {"ref": ActorGroup(ReferenceModel, res, base, name="reference-full"),
              "rm": ActorGroup(RewardModel, res, reward_base, name="reward-full"),
              "ref3": ActorGroup(ReferenceModel, res, base, "float32", 2, None, True, False, name="reference-zero3"),
              "rm3": ActorGroup(RewardModel, res, reward_base, "float32", 2, None, True, True, name="reward-offload")}
    try:
        for name in ("ref3", "rm3"):  # each rank holds half the parameters (a layer is 2-D: halves within 1 %)
            held = ray.get([a.__ray_call__.remote(parameter_elements) for a in groups[name].actors])
            assert all(abs(mine / whole - 0.5) < 0.01 for mine, whole in held), held
        seqs = [it["input_ids"] for it in sft_items[:5]]
        want_lp, want_score = groups["ref"].map("logprobs", seqs), groups["rm"].map("score", seqs)
        assert _max_diff(groups["ref3"].map("logprobs", seqs), want_lp) < 1e-5
        assert _max_diff([groups["rm3"].map("score", seqs)], [want_score]) < 1e-5
        samples = [{"prompt_ids": s[:3], "response_ids": s[3:]} for s in seqs]
        engines = [samples[:2], samples[2:]]  # two engines' results, as the rollout producer chains them
        chained = gather([a.logprobs_of_share.remote(*engines) for a in groups["ref3"].actors])
        assert _max_diff([x for part in chained for x in part], want_lp) < 1e-5
        chained = gather([a.score_share.remote(*engines) for a in groups["rm3"].actors])
        assert _max_diff([[x for part in chained for x in part]], [want_score]) < 1e-5
        for name in ("ref3", "rm3"):
            groups[name].run("set_micro_batching", 16, 512)
        mixed = seqs + [s[: len(s) // 3] for s in seqs]  # short ones share a row
        assert _max_diff(groups["ref3"].map("logprobs", mixed), groups["ref"].map("logprobs", mixed)) < 1e-5
        assert _max_diff([groups["rm3"].map("score", mixed)], [groups["rm"].map("score", mixed)]) < 1e-5
    finally:
        for g in groups.values():
            g.shutdown()


def _max_diff(xs, ys) -> float:
    return max(abs(a - b) for x, y in zip(xs, ys, strict=True) for a, b in zip(x, y, strict=True))


def test_packed_micro_batches_give_the_padded_logprobs_loss_and_step(policy, sft_items, tmp_path):
    """max_tokens_per_micro_batch: items packed into rows (no item sees another) give the padded
    log-probs to 1e-5 in fp32, and a PPO step on them has the same loss, one optimiser step, and
    moves the weights the same way, though the micro-batches differ."""
    short = [{"input_ids": it["input_ids"][:n], "loss_mask": [0] * (n // 2) + [1] * (n - 1 - n // 2)}
             for it in sft_items for n in [max(4, len(it["input_ids"]) // 3)]]
    mixed = [x for pair in zip(sft_items, short) for x in pair]  # long and short on every rank
    ppo = [dict(it, old_logprobs=[-2.0] * len(it["loss_mask"]),
                advantages=[(-1.0) ** i * 0.5] * len(it["loss_mask"])) for i, it in enumerate(mixed)]
    policy.run("save", str(tmp_path / "ckpt"))
    try:
        padded_lp = policy.map("logprobs", mixed)
        padded = ray.get(policy.split_call("train_step", ppo, "ppo"))
        padded_after = policy.map("logprobs", mixed)
        policy.run("load", str(tmp_path / "ckpt"))
        policy.run("set_micro_batching", 8, 1024)
        assert _max_diff(policy.map("logprobs", mixed), padded_lp) < 1e-5
        packed = ray.get(policy.split_call("train_step", ppo, "ppo"))
        packed_after = policy.map("logprobs", mixed)
    finally:
        policy.run("set_micro_batching", TRAINER.micro_batch_size, None)
    for a, b in zip(padded, packed):
        assert b["micro_batches"] < a["micro_batches"]  # packing did pack
        assert a["optimizer_steps"] == b["optimizer_steps"] == 1 and a["items"] == b["items"], (a, b)
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6), (a, b)
    moved = _max_diff(padded_after, padded_lp)
    assert _max_diff(packed_after, padded_after) < 1e-4 < 1e-2 < moved


def test_critic_values_and_value_step(ray_cluster, builtin_assets, sft_items):
    cfg = TrainerConfig(num_ranks=1, num_cpus_per_rank=0.5, micro_batch_size=8, zero_stage=3)
    critic = ActorGroup(Critic, cfg, str(builtin_assets.reward_base), cfg.model_dump(), 100, name="critic")
    try:
        items = sft_items[:8]
        values = critic.map("values", items)
        assert [len(v) for v in values] == [len(it["input_ids"]) - 1 for it in items]
        targets = [dict(it, old_values=v, returns=[1.0] * len(v)) for it, v in zip(items, values)]
        mixed = items + [dict(it, input_ids=it["input_ids"][:5], loss_mask=it["loss_mask"][:4]) for it in items]
        padded = critic.map("values", mixed)
        critic.run("set_micro_batching", 8, 512)
        assert _max_diff(critic.map("values", mixed), padded) < 1e-5  # packed rows: the same values
        critic.run("set_micro_batching", 8, None)
        losses = [ray.get(critic.split_call("train_step", targets, "value"))[0]["loss"] for _ in range(8)]
        assert losses[-1] < losses[0] * 0.8, losses  # values move toward the returns
    finally:
        critic.shutdown()


def test_hf_engine_behind_the_same_interface(policy, ray_cluster, builtin_assets, tokenizer, sft_items):
    """rollout.engine=hf: same samples contract, seeded samples independent of the engine split,
    the same in-place weight sync, log-probs equal to the trainer's."""
    from rlhf_cluster.actors.rollout import HFRolloutEngine, generate_across

    res = GroupResources(num_ranks=2, num_cpus_per_rank=0.25)
    hf = ActorGroup(HFRolloutEngine, res, str(builtin_assets.base), ROLLOUT.model_dump(), name="rollout-hf")
    try:
        prompts = _prompt_ids(tokenizer)
        samples = generate_across(hf, prompts, seed=7)
        assert len(samples) == len(prompts) * ROLLOUT.samples_per_prompt
        assert [s["prompt_index"] for s in samples] == [i for i in range(len(prompts))
                                                        for _ in range(ROLLOUT.samples_per_prompt)]
        for s in samples:
            assert len(s["logprobs"]) == len(s["response_ids"]) <= ROLLOUT.max_new_tokens
            assert s["finished"] == (s["response_ids"][-1] == tokenizer.eos_token_id)
        one = ray.get(hf.actors[0].generate.remote(prompts, None, 7))  # all prompts on one engine
        assert [s["response_ids"] for s in one] == [s["response_ids"] for s in samples]
        ray.get(policy.split_call("train_step", sft_items, "sft"))
        buckets = [ref for part in policy.run("export_weights") for ref in part]
        assert ray.get([a.update_weights.remote(buckets, 3) for a in hf.actors]) == [39, 39]
        with pytest.raises(ray.exceptions.RayTaskError, match="holds weights version 3, expected 2"):
            ray.get(hf.actors[0].generate.remote(prompts, None, 7, 2))
        after = generate_across(hf, prompts, seed=7, version=3)
        assert _max_gap(after, _response_logprobs(policy, after)) < 1e-4
    finally:
        hf.shutdown()


def test_lora_policy_syncs_its_adapted_weights_into_vllm(ray_cluster, engine, builtin_assets, tokenizer, sft_items):
    """trainer.lora.enabled: only the adapters train; vLLM samples from the merged, adapted policy."""
    from rlhf_cluster.lib.config import LoraConfig

    cfg = TRAINER.model_copy(update={"num_ranks": 1, "num_cpus_per_rank": 0.25,
                                     "lora": LoraConfig(enabled=True, rank=8, alpha=16.0)})
    cfg.optim = cfg.optim.model_copy(update={"lr": 1e-2})
    lora = ActorGroup(PolicyTrainer, cfg, str(builtin_assets.base), cfg.model_dump(), 1000, name="policy-lora")
    try:
        before = lora.map("logprobs", sft_items)
        for _ in range(3):
            ray.get(lora.split_call("train_step", sft_items, "sft"))
        after = lora.map("logprobs", sft_items)
        assert max(abs(a - b) for x, y in zip(before, after) for a, b in zip(x, y)) > 1e-2  # it learned
        buckets = [ref for part in lora.run("export_weights") for ref in part]
        assert ray.get(engine.actors[0].update_weights.remote(buckets, 100)) == 39  # plain names, merged
        samples = ray.get(engine.actors[0].generate.remote(_prompt_ids(tokenizer)))
        lora_lps = _response_logprobs(lora, samples)
        assert _max_gap(samples, lora_lps) < 1e-3
    finally:
        lora.shutdown()


@pytest.mark.long
def test_gradient_checkpointing_and_offload_give_the_same_step(ray_cluster, builtin_assets, sft_items):
    """trainer.gradient_checkpointing recomputes activations in backward; trainer.offload (ZeRO-Offload under
    ZeRO-3: optimizer state and parameter shards in host memory, DeepSpeed's CPU Adam) moves the step off the
    device: each gives the same loss and the same step (weights after it within 1e-5 in fp32) as neither."""
    groups = {}
    try:
        for switch in ("neither", "gradient_checkpointing", "offload"):
            cfg = TrainerConfig(num_ranks=1, num_cpus_per_rank=0.5, micro_batch_size=8, zero_stage=3,
                                **({switch: True} if switch != "neither" else {}))
            groups[switch] = ActorGroup(PolicyTrainer, cfg, str(builtin_assets.base), cfg.model_dump(), 100,
                                        name=f"policy-{switch}")
        items = sft_items[:8]
        steps = {k: ray.get(g.split_call("train_step", items, "sft"))[0] for k, g in groups.items()}
        after = {k: g.map("logprobs", items) for k, g in groups.items()}
        for switch in ("gradient_checkpointing", "offload"):
            assert steps[switch]["loss"] == pytest.approx(steps["neither"]["loss"], abs=1e-6), switch
            assert _max_diff(after[switch], after["neither"]) < 1e-5, switch
    finally:
        for g in groups.values():
            g.shutdown()


def test_an_engine_samples_exactly_again_after_poisoned_weights_and_a_rollback(engine, builtin_assets, tokenizer):
    """Poisoned (NaN) weights synced into an engine and sampled from, then the rollback's re-sync of the good weights
    with the KV cache cleared (`clear_kv_cache`, as PPORun.load_checkpoint does): the engine samples exactly what
    it sampled before, token for token and log-prob for log-prob. Without the clear, the NaN that the poisoned
    forward left in freed KV blocks reaches later samples, whatever weights are loaded (chaos seed 5 on a CPU
    without AVX-512: the rolled-back iteration sampled differently)."""
    import math

    from safetensors.torch import load_file, save

    actor = engine.actors[0]
    good = load_file(builtin_assets.base / "model.safetensors")
    poisoned = {k: v.clone().fill_(float("nan")) if k == "model.embed_tokens.weight" else v for k, v in good.items()}

    def load(state: dict, version: int) -> None:
        assert ray.get(actor.update_weights.remote([ray.put(save(state))], version)) == len(state)

    def sample() -> list[dict]:
        return ray.get(actor.generate.remote(_prompt_ids(tokenizer), None, 7))

    load(good, 200)
    ray.get(actor.clear_kv_cache.remote())
    before = sample()
    load(poisoned, 201)
    assert all(math.isnan(lp) for s in sample() for lp in s["logprobs"])  # the poisoned forward fills the cache
    load(good, 202)
    stale = sample()
    print("reloaded good weights, KV cache not cleared: same tokens as before the poison:",
          [s["response_ids"] for s in stale] == [s["response_ids"] for s in before])
    assert ray.get(actor.clear_kv_cache.remote()) >= 1
    after = sample()
    assert [s["response_ids"] for s in after] == [s["response_ids"] for s in before]
    assert [s["logprobs"] for s in after] == [s["logprobs"] for s in before]
