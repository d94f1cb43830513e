"""What the Ray Train stages (SFT, reward model, DPO) share.

Driver side, in the order a job runs (`run_stage`): resource checks and Ray (`scaffold.connect`),
`train` (a TorchTrainer whose workers each hold a DeepSpeed engine), `publish` (copy the final HF
model out of the last Ray checkpoint atomically, write metrics JSONL, the loss curve and a summary)
and `gold.gold_eval` (sample held-out prompts with vLLM, score them with the gold scorer).

Worker side: `fit`, the one training loop every stage uses. It resumes from
`ray.train.get_checkpoint()`, walks deterministic shuffled global batches (so a resumed run sees
the batches the failed one would have), evaluates and checkpoints every few steps, and ends with
a checkpoint holding the exported model.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from rlhf_cluster import scaffold
from rlhf_cluster.lib.config import ConfigError, LoraConfig, StageConfig
from rlhf_cluster.lib.data import DataError
from rlhf_cluster.lib.files import replaced_dir, write_atomic, write_json
from rlhf_cluster.lib.gold import gold_eval
from rlhf_cluster.lib.report import loss_curves

# --------------------------------------------------------------------------- driver: Ray


def train(stage: str, loop: Callable, cfg: StageConfig, loop_config: dict):
    """Run `loop` on cfg.trainer.num_ranks Ray Train workers; returns the ray.train.Result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t = cfg.trainer
    progress = Path(cfg.output_dir).resolve() / "progress.jsonl"
    progress.parent.mkdir(parents=True, exist_ok=True)
    progress.unlink(missing_ok=True)
    use_gpu = t.num_gpus_per_rank > 0
    resources = {"CPU": t.num_cpus_per_rank, **({"GPU": t.num_gpus_per_rank} if use_gpu else {})}
    trainer = TorchTrainer(
        loop,
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "progress": str(progress), **loop_config},
        scaling_config=ScalingConfig(num_workers=t.num_ranks, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}",  # a new run never resumes an old one
            storage_path=str(Path(cfg.output_dir).resolve() / "ray"),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
    )
    with follow_progress(stage, progress):
        return trainer.fit()


@contextlib.contextmanager
def follow_progress(stage: str, path: Path, every_s: float = 1.0):
    """Print the lines rank 0 appends to `path` (`fit`) while the stage trains: the workers' own output does not
    reach a driver started with log_to_driver=False (a PPO job training the built-in models first)."""
    import threading

    stop, seen = threading.Event(), [0]

    def show():
        if path.exists():
            text = path.read_text()
            lines = text[:text.rfind("\n") + 1].splitlines()  # complete lines only: rank 0 may be writing one
            for line in lines[seen[0]:]:
                print(progress_line(stage, json.loads(line)), flush=True)
            seen[0] = len(lines)

    def follow():
        while not stop.wait(every_s):
            show()

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        show()


def progress_line(stage: str, p: dict) -> str:
    return (f"{stage}: step {p['step']}/{p['total']} | loss {p['loss']:.4f} | {p['tokens_per_s']:,.0f} tokens/s | "
            f"{p['elapsed_s']:.0f} s, about {p['left_s']:.0f} s left")


def sample_tokens(sample) -> int:
    """Tokens in one training sample: its sequence, or every sequence of a pair (chosen, rejected, edited)."""
    if hasattr(sample, "input_ids"):
        return len(sample.input_ids)
    if isinstance(sample, dict):
        return sum(sample_tokens(v) for v in sample.values() if isinstance(v, dict) or hasattr(v, "input_ids"))
    return 0


# --------------------------------------------------------------------------- driver: outputs


def run_stage(stage: str, cfg: StageConfig, resolve: Callable, load_data: Callable, train_loop: Callable,
              fail_at_step: int | None = None) -> dict:
    """The driver every stage runs: checks, data (bad data fails here, before Ray), Ray Train, publish.

    Returns what the stage's summary is made of: paths, the skip report, the Ray result, the
    published model directory, its metrics history, the output directory and the summary so far.
    """
    from transformers import AutoTokenizer

    t0 = time.time()
    scaffold.precheck(cfg)
    paths = resolve(cfg)
    report = load_data(cfg, paths, AutoTokenizer.from_pretrained(paths["model"]), log=print)[-1]
    scaffold.connect(cfg)  # resource checks, then Ray (resolve() may have started it to train the SFT policy)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    marker = str(out.resolve() / "fault-injected") if fail_at_step is not None else None
    result = train(stage, train_loop, cfg, {"paths": paths, "fail_at_step": fail_at_step, "marker": marker})
    model_dir, history = publish(result, out)
    summary = {"model": str(model_dir), "train_samples": report.kept, "train_skipped": dict(report.skipped),
               "steps": history[-1]["step"], "resumed_from_step": result.metrics.get("resumed_from_step", 0),
               "train_seconds": round(result.metrics.get("train_seconds", 0.0), 1)}
    return {"paths": paths, "model_dir": model_dir, "history": history, "out": out, "t0": t0, "summary": summary,
            "cfg": cfg}


def add_gold_eval(run: dict, cfg, llm=None) -> None:
    """Gold score (and its standard error) of the initial and the trained policy on the test prompts, into
    the summary: reported only, the stage's model is its last step whatever it scores."""
    paths, summary = run["paths"], run["summary"]
    if cfg.gold_eval and paths["prompts"]:
        from rlhf_cluster.lib.reward_functions import exact_match

        gold = gold_eval({"before": Path(paths["model"]), "after": run["model_dir"]}, Path(paths["prompts"]),
                         cfg.rollout, cfg.seed, llm=llm,
                         verifier=exact_match if cfg.builtin.task == "arithmetic" else None)
        summary.update(gold_before=gold["before"]["gold"], gold_after=gold["after"]["gold"],
                       gold_after_se=gold["after"]["gold_se"],
                       gold_examples=gold["after"]["examples"])


def finish_stage(stage: str, run: dict) -> Path:
    from rlhf_cluster.lib.tracking import track_finished

    run["summary"]["seconds"] = round(time.time() - run["t0"], 1)
    summarize(stage, run["out"], run["summary"])
    track_finished(run["cfg"], run["out"], stage, run["history"], run["summary"], run["out"] / "loss.png",
                   str(run["model_dir"]))
    return run["model_dir"]


def publish(result, out: Path) -> tuple[Path, list[dict]]:
    """Final model and metrics out of the last checkpoint: out/model, out/metrics.jsonl, out/loss.png."""
    if result.checkpoint is None:
        raise RuntimeError(f"the training run ended without a checkpoint (error: {result.error})")
    out.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as d:
        d = Path(d)
        if not (d / "model" / "config.json").exists():
            raise RuntimeError(f"the last checkpoint {result.checkpoint.path} holds no exported model")
        with replaced_dir(out / "model") as tmp:
            shutil.copytree(d / "model", tmp, dirs_exist_ok=True)
        history = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    write_atomic(out / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in history))
    loss_curves(history, out / "loss.png")
    return out / "model", history


def summarize(stage: str, out: Path, summary: dict) -> None:
    """Write out/summary.json and print the few numbers and paths a person wants to see."""
    write_json(out / "summary.json", summary)
    print(f"\n== {stage} done in {summary.get('seconds', 0):.0f} s")
    for key, value in summary.items():
        if key != "seconds":
            print(f"  {key}: {round(value, 4) if isinstance(value, float) else value}")
    print(f"  files: {out / 'model'}, {out / 'metrics.jsonl'}, {out / 'loss.png'}, {out / 'summary.json'}")


# --------------------------------------------------------------------------- data (driver and workers)


def resolve_paths(cfg: StageConfig, builtin_data: str, builtin_model: Callable) -> dict:
    """Model and data paths of a stage; the built-in task fills what the config leaves null: the
    model `builtin_model(assets)`, the data `<builtin_data>_{train,eval}.jsonl` and held-out prompts."""
    paths = {"model": cfg.model.path, "train": cfg.data.train, "eval": cfg.data.eval, "prompts": None}
    if cfg.model.path is None or cfg.data.train is None:
        from rlhf_cluster.lib.builtin import ensure_builtin

        assets = ensure_builtin(cfg.builtin)
        if cfg.model.path is None:
            paths["model"] = str(builtin_model(assets))
        if cfg.data.train is None:
            if not assets.file(f"{builtin_data}_train.jsonl").exists():
                raise ConfigError(f"the built-in {cfg.builtin.task} task has no {builtin_data} data; "
                                  "set data.train (and data.eval) or another builtin.task")
            paths["train"] = str(assets.file(f"{builtin_data}_train.jsonl"))
            paths["eval"] = paths["eval"] or str(assets.file(f"{builtin_data}_val.jsonl"))
            paths["prompts"] = str(assets.file("prompts_test.jsonl"))
    return paths


def load_train_and_held(cfg: StageConfig, paths: dict, tokenizer, kind: str, log=None, noun: str = "data"):
    """(train records, held-out records or None, train skip report) of a stage, as `load_tokenized` reads them."""
    from rlhf_cluster.lib.data import load_tokenized

    d = cfg.data
    train, report = load_tokenized(paths["train"], tokenizer, kind, d.max_sequence_tokens, d.on_bad_sample, d.keys())
    held, held_report = (load_tokenized(paths["eval"], tokenizer, kind, d.max_sequence_tokens, d.on_bad_sample,
                                        d.keys())
                         if paths["eval"] else (None, None))
    if log:
        log(f"train {noun}: {report}")
        if held_report:
            log(f"held-out {noun}: {held_report}")
    return train, held, report


# --------------------------------------------------------------------------- worker side


def start_worker(config: dict, config_cls, load_data: Callable):
    """The start of every stage's train_loop: (typed config, paths, tokenizer, train, held-out)."""
    from transformers import AutoTokenizer

    cfg = config_cls.model_validate(config["cfg"])
    paths = config["paths"]
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(paths["model"])
    train, held, _ = load_data(cfg, paths, tokenizer)
    return cfg, paths, tokenizer, train, held


def stage_engine(cfg: StageConfig, model_cls, model_path: str, task_type: str, n_train: int, **load_kwargs):
    """The stage's model (in LoRA adapters when trainer.lora asks) in a DeepSpeed engine scheduled for
    the whole run. `load_kwargs` go to from_pretrained (e.g. num_labels, pad_token_id)."""
    from rlhf_cluster.lib.deepspeed_setup import load_pretrained, make_engine, with_lora

    model = load_pretrained(model_cls, model_path, cfg.trainer, cfg.model.dtype, **load_kwargs)
    if cfg.trainer.lora.enabled:
        model = with_lora(model, cfg.trainer.lora, task_type)
    return make_engine(model, cfg.trainer, cfg.epochs * steps_per_epoch(n_train, cfg), cfg.model.dtype)


def rank_world() -> tuple[int, int]:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def all_mean(values: dict[str, float]) -> dict[str, float]:
    """Average a dict of floats over ranks (every rank must call it with the same keys)."""
    if not torch.distributed.is_initialized() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return {k: v / torch.distributed.get_world_size() for k, v in zip(keys, t.tolist())}


def global_batch(cfg: StageConfig) -> int:
    t = cfg.trainer
    return t.micro_batch_size * t.grad_accumulation * t.num_ranks


def steps_per_epoch(n: int, cfg: StageConfig) -> int:
    """Optimizer steps per epoch (the last incomplete global batch is dropped)."""
    if n < global_batch(cfg):
        raise DataError(f"{n} training samples are fewer than one global batch of {global_batch(cfg)} "
                        "(trainer.micro_batch_size x grad_accumulation x num_ranks)")
    return n // global_batch(cfg)


def eval_shards(n: int, micro: int) -> list[tuple[list[int], list[float]]]:
    """This rank's micro-batches over n held-out samples, as (indices, weights).

    Every rank runs the same number of forward passes (ZeRO-3 gathers weights collectively),
    so the tail is padded with sample 0 at weight 0.
    """
    rank, world = rank_world()
    per_rank = -(-n // world)
    per_rank = -(-per_rank // micro) * micro
    idx = list(range(rank, n, world))
    weights = [1.0] * len(idx) + [0.0] * (per_rank - len(idx))
    idx += [0] * (per_rank - len(idx))
    return [(idx[i:i + micro], weights[i:i + micro]) for i in range(0, per_rank, micro)]


def weighted_all_sum(pairs: dict[str, tuple[float, float]]) -> dict[str, float]:
    """{key: (weighted sum, weight)} summed over ranks -> {key: sum / weight}."""
    keys = sorted(pairs)
    t = torch.tensor([[pairs[k][0], pairs[k][1]] for k in keys], dtype=torch.float64)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
    return {k: (s / w if w else float("nan")) for k, (s, w) in zip(keys, t.tolist())}


def export_model(engine, out: Path, cls, init_dir: str, lora: LoraConfig | None, task_type: str,
                 load_kwargs: dict | None = None) -> None:
    """Write the trained weights as a plain HF directory (LoRA merged) on rank 0. All ranks call it.

    The weights are gathered from ZeRO-3 partitions, loaded into a fresh CPU copy of the initial
    model (plus adapters when LoRA is on), merged and saved with the tokenizer.
    """
    from transformers import AutoTokenizer

    from rlhf_cluster.lib.deepspeed_setup import gathered_state_dict, tied_names, with_lora

    state = gathered_state_dict(engine)
    if rank_world()[0] != 0:
        return
    gc.collect()  # drop the HfDeepSpeedConfig of loading so this copy is not ZeRO-3 partitioned
    model = cls.from_pretrained(init_dir, dtype=torch.float32, **(load_kwargs or {}))
    if lora is not None and lora.enabled:
        model = with_lora(model, lora, task_type)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = tied_names(model)  # sent once, under the first name
    if unexpected or [k for k in missing if "rotary" not in k and k not in tied]:
        raise RuntimeError(f"exported weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if lora is not None and lora.enabled:
        model = model.merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(init_dir).save_pretrained(out)


def _maybe_fail(step: int, fail_at_step: int | None, marker: str | None) -> None:
    """Fault injection for the resume test: the last rank dies once, at `fail_at_step`."""
    rank, world = rank_world()
    if fail_at_step is None or step != fail_at_step or rank != world - 1 or marker is None:
        return
    if os.path.exists(marker):
        return
    Path(marker).write_text(f"killed rank {rank} at step {step}\n")
    print(f"[fault injection] rank {rank} exits at step {step}", flush=True)
    os._exit(1)


def _checkpoint(engine, step: int, history: list[dict], metrics: dict, export: Callable | None = None) -> None:
    """DeepSpeed state of every rank (+ the exported model at the end) as one Ray Train checkpoint.

    Each rank writes its own ZeRO shard; Ray merges the ranks' directories into one checkpoint,
    and registers it only once all ranks reported, so a crash never leaves half a checkpoint.
    """
    import ray.train

    rank, _ = rank_world()
    with tempfile.TemporaryDirectory(prefix="rlhf-ckpt-") as d:
        engine.save_checkpoint(d, tag="ds")
        if export is not None:
            export(Path(d) / "model")
        if rank == 0:
            (Path(d) / "state.json").write_text(json.dumps({"step": step}))
            (Path(d) / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def _restore(engine) -> tuple[int, list[dict]]:
    """(step, metrics history) of the last checkpoint, with the engine's weights, optimizer and LR schedule."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0, []
    with ckpt.as_directory() as d:
        engine.load_checkpoint(d, tag="ds")
        step = json.loads((Path(d) / "state.json").read_text())["step"]
        history = [json.loads(line) for line in (Path(d) / "metrics.jsonl").read_text().splitlines()]
    print(f"[resume] rank {rank_world()[0]} restored step {step} from {ckpt.path}", flush=True)
    return step, [h for h in history if h["step"] <= step]


def fit(cfg: StageConfig, engine, n_train: int, train_step: Callable, evaluate: Callable | None,
        export: Callable, fail_at_step: int | None = None, marker: str | None = None,
        tokens: list[int] | None = None, progress: str | None = None) -> None:
    """The shared worker loop.

    train_step(indices) -> (loss, metrics) on one micro-batch of training-sample indices;
    evaluate() -> held-out metrics (collective); export(dir) writes the HF model (collective).
    `tokens`: each training sample's token count; `progress`: the file rank 0 appends a progress line to about
    every twentieth of the steps (step/total, loss, tokens/s, time left), which the driver prints.
    """
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")  # DeepSpeed's collectives
    rank, world = rank_world()
    t = cfg.trainer
    per_epoch = steps_per_epoch(n_train, cfg)
    total = cfg.epochs * per_epoch
    step, history = _restore(engine)
    resumed_from = step
    if step == 0 and evaluate is not None:
        history.append({"step": 0, **evaluate()})
    t0 = time.time()
    every, seen_tokens = max(1, total // 20), 0.0
    while step < total:
        _maybe_fail(step, fail_at_step, marker)
        epoch, k = divmod(step, per_epoch)
        order = torch.randperm(n_train, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch)).tolist()
        mine = order[k * global_batch(cfg):(k + 1) * global_batch(cfg)][rank::world]
        engine.train()
        sums: dict[str, float] = {}
        for i in range(0, len(mine), t.micro_batch_size):
            loss, metrics = train_step(mine[i:i + t.micro_batch_size])
            engine.backward(loss)
            engine.step()
            for key, value in {"loss": loss.item(), **metrics}.items():
                sums[key] = sums.get(key, 0.0) + value / t.grad_accumulation
        step += 1
        sums["tokens"] = float(sum(tokens[i] for i in mine)) if tokens else 0.0
        means = all_mean(sums)
        seen_tokens += means.pop("tokens") * world
        row = {"step": step, "epoch": epoch, "lr": engine.get_lr()[0], **{f"train_{k}": v for k, v in means.items()}}
        if evaluate is not None and (step % cfg.eval_every == 0 or step == total):
            row.update(evaluate())
        history.append(row)
        if rank == 0 and progress and (step % every == 0 or step == total):
            elapsed = time.time() - t0
            line = {"step": step, "total": total, "loss": row["train_loss"], "tokens_per_s": seen_tokens / elapsed,
                    "elapsed_s": elapsed, "left_s": elapsed / (step - resumed_from) * (total - step)}
            with open(progress, "a") as f:
                f.write(json.dumps(line) + "\n")
        if step % cfg.checkpoint_every == 0 and step < total:
            _checkpoint(engine, step, history, row)
    final = {**history[-1], "resumed_from_step": resumed_from, "train_seconds": time.time() - t0}
    _checkpoint(engine, total, history, final, export=export)
