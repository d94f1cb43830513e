"""Ray Serve applications (FastAPI ingress): reward scoring and checkpoints, over a registry."""
