"""Ray Serve applications (FastAPI ingress), one module each: reward_app (scoring; its request bodies in
reward_schemas, its model code in reward_model), checkpoints_app, policy_app and feedback_app. common holds what they
share (auth, request guards, start-up); launch deploys configs/serve.yaml, as `python -m rlhf_cluster.serve` does."""
