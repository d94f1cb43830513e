"""What every job's config is made of: the strict model base, the error type, the sections every job has
(cluster, built-in task, data, tracking) and JobConfig, and where the shipped presets live."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

REPO_ROOT = Path(__file__).resolve().parents[3]  # the checkout (docs/, bench/): not part of an installed package
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"  # the presets, shipped inside the package


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the config."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


class ModelSource(Strict):
    """Where a model comes from: a local HF directory, or the built-in one when null."""

    path: str | None = None
    """a local Hugging Face model directory; null: the built-in model of this role"""
    dtype: Literal["float32", "bfloat16"] | None = None
    """null: the job's `precision` decides"""


class BuiltinConfig(Strict):
    """The embedded default: built-in task and locally built Llama models."""

    task: Literal["helpful", "arithmetic"] = "helpful"
    """helpful: preference data with a hidden gold scorer (helpfulness, safety); arithmetic: problems with exact
    answers as labels, scored by the shipped verifier (pass@k)"""
    size: Literal["tiny", "small"] = "tiny"
    """size of the locally built Llama models: tiny (0.9 M parameters) or small (~24 M)"""
    seed: int = 0
    """seed of the built-in task's data and models"""
    label_noise: float = Field(0.1, ge=0.0, lt=0.5)
    """share of the built-in preference pairs whose label is flipped, as noisy human labels"""
    cache_dir: str | None = None
    """default: $RLHF_CLUSTER_CACHE or ~/.cache/rlhf-cluster"""


class DataConfig(Strict):
    """Training, validation and test files (JSONL or Parquet, HF chat format); null: the built-in task.

    `eval` is the validation set: what a job measures during training and what chooses (best
    checkpoint, promotion). `test` is only reported; nothing reads it to decide anything.
    """

    train: str | None = None
    """training file; null: the built-in task's"""
    eval: str | None = None
    """validation file: measured during training, and what chooses (best checkpoint, promotion)"""
    test: str | None = None
    """test file: reported only, never read to choose anything"""
    max_prompt_tokens: int = Field(64, gt=0)
    """a prompt longer than this many tokens is a bad sample"""
    max_sequence_tokens: int = Field(128, gt=0)
    """a prompt + response longer than this many tokens is a bad sample"""
    on_bad_sample: Literal["skip", "error"] = "skip"
    """skip: count bad samples in the load report; error: stop, naming file, record and field"""
    label_key: str = "label"
    """prompt records' label (a reference answer, unit tests: any JSON value), passed to reward functions"""
    prompt_key: str = "prompt"
    """the file's field holding the prompt (a string, turns, or absent for HH transcripts)"""
    chosen_key: str = "chosen"
    """the file's field holding the preferred response (a string, turns, a whole conversation, an HH transcript)"""
    rejected_key: str = "rejected"
    """the file's field holding the other response"""
    messages_key: str = "messages"
    """the file's field holding a chat (a list of turns, or an HH transcript string)"""

    def keys(self) -> dict[str, str]:
        """The key mapping lib/data.py reads files with."""
        return {"prompt": self.prompt_key, "chosen": self.chosen_key, "rejected": self.rejected_key,
                "messages": self.messages_key, "label": self.label_key}

    @model_validator(mode="after")
    def _prompt_fits(self) -> DataConfig:
        if self.max_prompt_tokens >= self.max_sequence_tokens:
            raise ValueError("max_prompt_tokens must be smaller than max_sequence_tokens")
        return self


class RayConfig(Strict):
    """address null: join the cluster of RAY_ADDRESS (as under `ray job submit`) or start a local one."""

    address: str | None = None
    """a cluster to join (host:port or ray://...); null: $RAY_ADDRESS, or a local cluster"""
    num_cpus: float | None = Field(None, gt=0)
    """logical CPUs of a locally started cluster"""
    num_gpus: float | None = Field(None, ge=0)
    """GPUs of a locally started cluster; null: what torch sees"""
    gpu_memory_gib: float | None = Field(None, gt=0)
    """each GPU's memory, for the memory plan (null: this machine's)"""


class TrackingConfig(Strict):
    """Where a run's config, metrics, report picture and final model pointer go (rlhf_cluster/lib/tracking.py),
    beside the run directory's metrics.jsonl."""

    backends: list[Literal["tensorboard", "mlflow", "wandb"]] = ["tensorboard"]
    """any of tensorboard (event files in the run), mlflow, wandb"""
    mlflow_uri: str | None = None
    """an MLflow tracking URI (a server, or sqlite:///path); null: a SQLite store in the run directory"""
    experiment: str | None = None
    """the MLflow experiment; null: rlhf-cluster-<job>"""
    wandb_project: str = "rlhf-cluster"
    """the Weights & Biases project"""
    wandb_mode: Literal["offline", "online"] = "offline"
    """offline: files in the run directory (`wandb sync` uploads them); online needs WANDB_API_KEY"""


class JobConfig(Strict):
    """What every job has: a seed, an output directory, a cluster and the built-in fallback."""

    seed: int = 0
    """seed of everything the job draws: data order, sampling, initialisation"""
    output_dir: str = "runs/job"
    """where the job writes its run: metrics, checkpoints, report, summary"""
    ray: RayConfig = RayConfig()
    """the Ray cluster to run on"""
    builtin: BuiltinConfig = BuiltinConfig()
    """the built-in task and models, used where data or model paths are null"""
    tracking: TrackingConfig = TrackingConfig()
    """experiment tracking: TensorBoard, MLflow, Weights & Biases"""
    precision: Literal["auto", "fp32", "bf16"] = "fp32"
    """the dtype of every model whose own `dtype` is null (rlhf_cluster/lib/precision.py): auto = bf16 on GPUs
    and on CPUs with bf16 units, fp32 elsewhere (configs/tiny-cpu.yaml, what `make run` runs, says auto); the
    run's first line says what was chosen and why. fp32 by default, so the built-in models and the figures
    measured in fp32 stay what they are on every machine
    """

    def resource_groups(self) -> dict[str, tuple[float, float]]:
        """name -> (cpus, gpus) this job will ask Ray for; checked against the cluster."""
        return {}

    def resolve_precision(self, flags: set[str]) -> str:
        """Fill every model's null `dtype` from `precision` (GPU: any group asks for GPUs; CPU: `flags`);
        returns the line that says what was chosen and why."""
        from rlhf_cluster.lib.precision import choose

        on_gpu = any(gpus > 0 for _, gpus in self.resource_groups().values())
        dtype, why = choose(self.precision, on_gpu, flags)
        shown = []
        for name in type(self).model_fields:
            source = getattr(self, name)
            if isinstance(source, ModelSource):
                source.dtype = source.dtype or dtype
                shown.append(f"{name} {source.dtype}")
        shown = ", ".join(shown)
        return f"precision: {dtype} ({why})" + (f"; {shown}" if shown else "")


def presets() -> list[str]:
    """The names of the configs shipped in the package (`--config smoke` is configs/smoke.yaml)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def preset_or_path(name: str | Path) -> Path:
    """A file that exists, else a preset of that name (a bare name, or a name ending in .yaml); else `name`."""
    path = Path(name)
    if path.is_file() or path.parent != Path("."):
        return path
    preset = CONFIG_DIR / (path.name if path.suffix == ".yaml" else f"{path.name}.yaml")
    return preset if preset.is_file() else path
