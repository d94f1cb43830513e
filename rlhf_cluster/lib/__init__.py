"""The library: configs, RL math and losses, data, models, DeepSpeed/LoRA/vLLM set-up, the
checkpoint registry and reports. It imports nothing from rlhf_cluster/actors/, rlhf_cluster/serve/ or the jobs."""
