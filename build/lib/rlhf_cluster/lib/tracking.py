"""Experiment tracking: a run's config, metrics, report picture and final model pointer, sent to the
backends `tracking.backends` names, beside the run directory's metrics.jsonl (always written):

  tensorboard  event files under <output_dir>/tensorboard
  mlflow       a run in `tracking.mlflow_uri` (default: a SQLite store at <output_dir>/mlflow.db, artifacts
               beside it — MLflow 3 keeps runs in a database; any tracking server URI works)
  wandb        a Weights & Biases run in `tracking.wandb_mode` (default offline: files under
               <output_dir>/wandb, uploaded later with `wandb sync`)
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def _flat(tree: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as dotted key -> JSON value string (MLflow parameters are flat strings)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = json.dumps(value)[:6000]
    return out


def _numbers(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tracker:
    """One run's trackers; `log` each metrics row, `finish` once with the summary."""

    def __init__(self, cfg, out: Path, job: str):
        t, out = cfg.tracking, Path(out)
        self.writer = self.mlflow = self.wandb = None
        if "tensorboard" in t.backends:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard"))
        if "mlflow" in t.backends:
            from mlflow import MlflowClient
            from mlflow.entities import Param

            uri = t.mlflow_uri or f"sqlite:///{out.resolve() / 'mlflow.db'}"
            self.mlflow = MlflowClient(tracking_uri=uri)
            name = t.experiment or f"rlhf-cluster-{job}"
            experiment = self.mlflow.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.mlflow.create_experiment(
                name, artifact_location=None if t.mlflow_uri else (out.resolve() / "mlflow-artifacts").as_uri())
            self.run_id = self.mlflow.create_run(experiment_id, run_name=out.name, tags={"job": job}).info.run_id
            params = [Param(k, v) for k, v in _flat(cfg.model_dump(mode="json")).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
                self.mlflow.log_batch(self.run_id, params=params[i:i + 100])
        if "wandb" in t.backends:
            import wandb

            self.wandb = wandb.init(project=t.wandb_project, name=out.name, dir=str(out), mode=t.wandb_mode,
                                    job_type=job, config=cfg.model_dump(mode="json"), reinit="create_new")
        self.uri = self.mlflow.tracking_uri if self.mlflow else None

    def log(self, metrics: dict, step: int) -> None:
        values = _numbers(metrics)
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
        if self.mlflow:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            batch = [Metric(k.replace("@", "_at_"), v, now, step) for k, v in values.items()]
            for i in range(0, len(batch), 1000):
                self.mlflow.log_batch(self.run_id, metrics=batch[i:i + 1000])
        if self.wandb:
            self.wandb.log(values, step=step)

    def finish(self, summary: dict, picture: Path | None = None, model: str | None = None) -> None:
        """The summary's numbers, the report picture and where the final model is; closes every backend."""
        if self.writer:
            self.writer.close()
        if self.mlflow:
            if picture and Path(picture).exists():
                self.mlflow.log_artifact(self.run_id, str(picture))
            if model:
                self.mlflow.set_tag(self.run_id, "model", str(model))
            for k, v in _numbers(summary).items():
                self.mlflow.set_tag(self.run_id, f"summary.{k}", str(v))
            self.mlflow.set_terminated(self.run_id)
        if self.wandb:
            import wandb

            self.wandb.summary.update(_numbers(summary) | ({"model": str(model)} if model else {}))
            if picture and Path(picture).exists():
                self.wandb.log({"report": wandb.Image(str(picture))})
            self.wandb.finish()


def track_finished(cfg, out: Path, job: str, history: list[dict], summary: dict, picture: Path | None,
                   model: str | None, step_key: str = "step") -> None:
    """A finished run's whole history at once (the Ray Train stages report to their driver at the end)."""
    tracker = Tracker(cfg, out, job)
    for i, row in enumerate(history):
        tracker.log(row, int(row.get(step_key, i)))
    tracker.finish(summary, picture, model)
