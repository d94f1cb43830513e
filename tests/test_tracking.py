"""Experiment tracking with the real packages: a local MLflow store (SQLite) and Weights & Biases offline."""

from __future__ import annotations

import pytest

from rlhf_cluster.lib.config import ConfigError, PPOConfig, load_config
from rlhf_cluster.lib.tracking import Tracker


def _picture(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.plot([0, 1], [0, 1])
    plt.savefig(path)
    plt.close()
    return path


def test_config_metrics_picture_and_model_reach_every_backend(tmp_path):
    from mlflow import MlflowClient

    cfg = load_config(PPOConfig, None, ["tracking.backends=[tensorboard, mlflow, wandb]", "trainer.zero_stage=2"])
    tracker = Tracker(cfg, tmp_path, "ppo")
    for step in (1, 2, 3):
        tracker.log({"reward/rm_score": 0.1 * step, "kl/coef": 0.05, "response/example": "text is skipped"}, step)
    tracker.finish({"gold_final": 0.8, "reported_split": "test"}, _picture(tmp_path / "report.png"), "/models/best")

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.params["trainer.zero_stage"] == "2"
    assert run.data.tags["model"] == "/models/best" and run.data.tags["summary.gold_final"] == "0.8"
    history = client.get_metric_history(tracker.run_id, "reward/rm_score")
    assert [(m.step, round(m.value, 6)) for m in history] == [(1, 0.1), (2, 0.2), (3, 0.3)]
    assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["report.png"]
    assert (tmp_path / "mlflow-artifacts").is_dir()  # the default store keeps artifacts in the run directory

    # W&B offline keeps the run in one binary file (`wandb sync` uploads it; 0.31 has no local reader): the
    # logged keys, the summary's numbers and the model pointer are in it
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    data = runs[0].read_bytes()
    assert all(x in data for x in (b"reward/rm_score", b"gold_final", b"/models/best", b"zero_stage"))
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match=r"tracking\.backends\.0: Input should be 'tensorboard', 'mlflow' or 'wandb'"):
        load_config(PPOConfig, None, ["tracking.backends=[comet]"])
