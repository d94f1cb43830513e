"""The parts an RL coordinator composes (rlhf_cluster.ppo, rlhf_cluster.rejection_sampling), one job each:

    groups.py       start the actor groups (policy, reference, reward, critic, rollout) and stop them
    rollout.py      the prompt order and the rollout producer: batches sampled on the engines, ahead of
                    the learner by at most `async_rollout.max_staleness` policy versions
    weights.py      weight versions and the sync trainer -> engines
    scoring.py      reference / reward / critic / old-policy passes over a batch, as tensors
    learner.py      PPO epochs over mini-batches on the policy (and critic) groups, PPO-ptx
    evaluation.py   held-out evaluation: greedy and sampled responses, gold, RM, KL, win-rate
    checkpoints.py  atomic checkpoints with manifests, pruning, the registry queue
    batch.py        how samples become trainer items (per-token fields aligned to positions)
"""
