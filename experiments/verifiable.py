"""The verifiable suite: vanilla GRPO and each DAPO-family stabiliser on the built-in arithmetic task, from its SFT
policy, rewarded by the shipped `exact_match` verifier. A suite takes hours, so it resumes: the runs of an earlier
JSON with the same settings and SFT policy are kept (`verifiable.resume`)."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from experiments.methods import job_log
from experiments.report import (
    RECORDED_VERIFIABLE,
    render_verifiable_md,
    verifiable_figure,
    verifiable_table,
    write_verifiable_report,
)
from experiments.stats import verifiable_aggregate
from rlhf_cluster import scaffold
from rlhf_cluster.lib.config import ConfigError, ResultsConfig
from rlhf_cluster.lib.files import write_json
from tools.machine import cpu_name, usable_cpus

# vanilla GRPO: configs/verifiable-grpo.yaml with the stabiliser validation chose for it switched off
VANILLA = ["dynamic_sampling.enabled=false"]
# each variant's switches on top of vanilla (the values DAPO and Dr. GRPO report); dynamic_sampling is the preset
VARIANT_OVERRIDES = {
    "grpo": [],
    "clip_higher": ["clip_eps_high=0.28"],
    "dynamic_sampling": ["dynamic_sampling.enabled=true"],
    "overlong": ["overlong.buffer=8", "overlong.penalty=1.0", "overlong.mask_truncated=true"],
    "dr_grpo": ["grpo_scale_by_std=false", "loss_agg=sequence_sum_norm"],
}


def verifiable_run(cfg: ResultsConfig, sft: Path, variant: str, seed: int, log=print) -> dict:
    """One GRPO run of `variant`; what it reports on the test split (at its start, the SFT policy, and at its
    end), and its cost; and its validation pass@1, which chooses the preset (`preset_choice`)."""
    from rlhf_cluster import ppo
    from rlhf_cluster.lib.config import CONFIG_DIR, PPOConfig, load_config

    out = Path(cfg.output_dir).resolve() / "verifiable" / variant / f"seed{seed}"
    to_file = job_log(out)
    v = cfg.verifiable
    run_cfg = load_config(PPOConfig, CONFIG_DIR / "verifiable-grpo.yaml", [
        f"seed={seed}", f"output_dir={out}", f"registry={out / 'registry'}", f"policy.path={sft}",
        f"precision={cfg.precision}", f"iterations={v.iterations}", f"eval_every={v.eval_every}",
        f"checkpoint_every={v.iterations}", "keep_checkpoints=1",
        *(f"builtin.{k}={val}" for k, val in cfg.builtin.model_dump().items() if val is not None and k != "task"),
        *VANILLA, *VARIANT_OVERRIDES[variant]])
    t0 = time.time()
    summary = ppo.run(run_cfg, log=to_file)
    seconds = time.time() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = run_curve(rows, run_cfg.eval_samples_per_prompt)
    filtered = [r["rollout/filtered_frac"] for r in rows if "rollout/filtered_frac" in r]
    return {"variant": variant, "seed": seed, "k": run_cfg.eval_samples_per_prompt, "initial": curve[0],
            "final": curve[-1], "curve": curve, "best_val_iteration": summary["best_val_iteration"],
            "filtered_frac": statistics.fmean(filtered) if filtered else None,
            "skipped": summary["faults"]["skipped_iterations"], "seconds": round(seconds, 1)}


def run_curve(rows: list[dict], k: int) -> list[dict]:
    """A run's held-out evaluations, from the rows of its metrics.jsonl: the test figures the page reports, and
    the validation pass@1 that chooses the preset."""
    return [{"iteration": r["iteration"], "pass@1": r["test/pass@1"], f"pass@{k}": r[f"test/pass@{k}"],
             "accuracy": r["test/gold"], "val_accuracy": r["val/gold"], "val_pass@1": r["val/pass@1"],
             "kl": r["test/sampled_kl"], "length": r["test/sampled_length"],
             "by_level": {key.rsplit("_", 1)[1]: val for key, val in r.items()
                          if key.startswith("test/accuracy/level_")}}
            for r in rows if "test/pass@1" in r]


def with_current_curve(run: dict, out: Path) -> dict:
    """A kept run, its curve re-read from its directory when that still holds it (so the record gains the fields
    added since it ran) and the test figures there are the recorded ones; else as recorded."""
    metrics = out / "verifiable" / run["variant"] / f"seed{run['seed']}" / "metrics.jsonl"
    if not metrics.exists():
        return run
    curve = run_curve([json.loads(line) for line in metrics.read_text().splitlines()], run["k"])
    same = [(p["iteration"], p["pass@1"]) for p in curve] == [(p["iteration"], p["pass@1"]) for p in run["curve"]]
    return run | {"curve": curve, "initial": curve[0], "final": curve[-1]} if same else run


def resumable_runs(previous: dict, fresh: dict, plan: list[tuple[str, int]]) -> dict:
    """The runs of an earlier suite's JSON that a resumed suite keeps: those in `plan`, when the earlier suite ran
    with the same settings (the variant lists aside), on the same vanilla GRPO, on the same CPU, from the same SFT
    policy. Files written before the policy's hash or vanilla's switches were recorded carry none and are taken on
    the rest (vanilla was then the yaml itself, which had no stabiliser on)."""
    def settings(res: dict) -> dict:
        cfg = json.loads(json.dumps(res["config"]))
        for key in ("variants", "variant_seeds", "every_seed", "resume"):
            cfg["verifiable"].pop(key, None)
        return {"config": cfg, "quick": res["quick"], "cpu": res["cpu"], "overrides": res["overrides"]}

    differ = [k for k, val in settings(fresh).items() if settings(previous)[k] != val]
    if previous.get("vanilla", fresh["vanilla"]) != fresh["vanilla"]:
        differ.append("vanilla")
    if previous.get("sft_sha256", fresh["sft_sha256"]) != fresh["sft_sha256"]:
        differ.append("the SFT policy")
    if differ:
        raise ConfigError(f"verifiable.resume: the results file's suite differs in {', '.join(differ)}; "
                          "run without resume (or with another results_file)")
    return {"runs": [r for r in previous["runs"] if (r["variant"], r["seed"]) in plan],
            "started": previous["started"], "duration_s": previous.get("duration_s", 0.0)}


def run(cfg: ResultsConfig, quick: bool = False, log=print) -> dict:
    """Vanilla GRPO (and the `every_seed` variants) over every seed and each other stabiliser over `variant_seeds`,
    from the arithmetic SFT policy."""
    from rlhf_cluster.lib.registry import checkpoint_sha256
    from rlhf_cluster.prerequisites import ensure_builtin_sft

    started, t_start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.time()
    scaffold.connect(cfg, log_to_driver=False)
    out = Path(cfg.output_dir).resolve()
    results_file = Path(cfg.results_file).resolve() if cfg.results_file else out / "verifiable.json"
    builtin = cfg.builtin.model_copy(update={"task": "arithmetic"})
    log("the built-in arithmetic SFT policy (trained first if missing)")
    sft = ensure_builtin_sft(builtin)
    v = cfg.verifiable
    plan = [(variant, seed) for variant in v.variants
            for seed in (cfg.seeds if variant in v.every_seed or v.variant_seeds is None else v.variant_seeds)]
    results = {"started": started, "cpu": cpu_name(), "cores": usable_cpus(), "quick": quick,
               "config": cfg.model_dump(mode="json"), "vanilla": VANILLA, "overrides": VARIANT_OVERRIDES,
               "sft_sha256": checkpoint_sha256(sft), "runs": [], "variants": {}}
    earlier_s = 0.0
    if v.resume and results_file.exists():
        kept = resumable_runs(json.loads(results_file.read_text()), results, plan)
        results["runs"] = [with_current_curve(r, out) for r in kept["runs"]]
        results["started"], earlier_s = kept["started"], kept["duration_s"]
        log(f"resuming {results_file}: kept {len(kept['runs'])} runs, {len(plan) - len(kept['runs'])} to go")
    done = {(r["variant"], r["seed"]) for r in results["runs"]}

    def collect():  # runs in plan order, and each variant's aggregate over its runs so far
        results["runs"].sort(key=lambda x: plan.index((x["variant"], x["seed"])))
        runs = results["runs"]
        results["variants"] = {n: verifiable_aggregate([x for x in runs if x["variant"] == n])
                               for n in dict.fromkeys(x["variant"] for x in runs)}

    collect()
    for i, (variant, seed) in enumerate(plan, 1):
        if (variant, seed) in done:
            continue
        r = verifiable_run(cfg, sft, variant, seed, log)
        results["runs"].append(r)
        collect()
        so_far = round(earlier_s + time.time() - t_start)
        write_json(results_file, results | {"duration_s": so_far}, indent=1)  # progress survives
        pk = f"pass@{r['k']}"
        log(f"[{i}/{len(plan)}] {variant} seed {seed}: test pass@1 {r['initial']['pass@1']:.3f} -> "
            f"{r['final']['pass@1']:.3f}, {pk} {r['initial'][pk]:.3f} -> {r['final'][pk]:.3f}, "
            f"{r['seconds']:.0f} s  ({(time.time() - t_start) / 60:.1f} min in)")
    results["duration_s"] = round(earlier_s + time.time() - t_start)
    write_json(results_file, results, indent=1)
    report_dir = out / "report"
    verifiable_figure(results, report_dir / "results")
    (report_dir / "results-verifiable.md").write_text(render_verifiable_md(results))
    if results_file == RECORDED_VERIFIABLE:
        write_verifiable_report(results)
    log("\n=== verifiable suite ===\n" + "\n".join(verifiable_table(results))
        + f"\nJSON: {results_file}\nreport: {report_dir / 'results-verifiable.md'}"
        + f"\n{results['duration_s'] / 60:.1f} min in all")
    return results
