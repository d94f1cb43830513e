"""The library: configs, RL math and losses, data, models, DeepSpeed/LoRA/vLLM set-up, the
checkpoint registry and reports. It imports nothing from actors/, serve/ or the jobs."""
