"""Ray actor groups: policy trainer (DeepSpeed ZeRO-3), reference, reward, critic, vLLM rollout engines.

Thin actors: each holds a model and calls the shared functions of rlhf_cluster.
"""
