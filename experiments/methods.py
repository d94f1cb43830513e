"""The methods suite: every method on the built-in task at one sample budget, over seeds, one evaluator.

Every method starts from the same built-in SFT policy and reward model:
    sft                  the starting policy, untrained
    best_of_k            K samples of the SFT policy, the reward model picks one (no training; KL <= log K - (K-1)/K)
    rejection_sampling   two rounds of best-of-K + fine-tuning (Llama 2), the best round promoted by validation gold
    ppo grpo rloo reinforce_pp   the PPO job with each advantage estimator (ppo = GAE with a critic)
    dpo ipo              offline, on the built-in training preference pairs
    rs_ppo               a rejection-sampling round, then PPO on the promoted model (the Llama 2 recipe)
    ppo_async grpo_async ppo / grpo with asynchronous rollout (async_rollout.max_staleness=1); not in the
                         default list: `methods=[ppo, grpo, ppo_async, grpo_async]` compares them with the synchronous
Online methods sample the same number of responses (`samples_per_method`); experiments/evaluator.py scores them.

The over-optimisation sweep (Gao et al. 2022) runs PPO at several KL coefficients with each reward-model size
and fits gold gain = d (alpha - beta d), d = sqrt(KL), on the sampled test responses of every evaluation.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from experiments.evaluator import Evaluator
from experiments.report import RECORDED, figures, methods_table, render_results_md, targets, write_report
from experiments.stats import aggregate, overoptimisation_fit
from rlhf_cluster import scaffold
from rlhf_cluster.lib.config import ResultsConfig
from rlhf_cluster.lib.files import write_json
from tools.machine import cpu_name, usable_cpus

PPO_FAMILY = ("ppo", "grpo", "rloo", "reinforce_pp")


def job_log(where: Path):
    """A fresh run directory (a previous run's checkpoints must not be taken for this one's) and its log."""
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir(parents=True)
    fh = (where / "log.txt").open("a")
    return lambda msg: (fh.write(str(msg) + "\n"), fh.flush())


class Harness:
    """Runs each method (its own job, in this process and Ray cluster) and hands its output to the evaluator."""

    def __init__(self, cfg: ResultsConfig, sft: Path, rm: Path, log=print):
        self.cfg, self.sft, self.rm, self.log = cfg, sft, rm, log
        self.out = Path(cfg.output_dir).resolve()

    def common(self, where: Path, seed: int) -> list[str]:
        return [f"registry={self.out / 'registry'}", f"registry_run={where.parent.name}-{where.name}",
                f"policy.path={self.sft}", f"reward.path={self.rm}", *self.stage_common(where, seed)]

    def stage_common(self, where: Path, seed: int) -> list[str]:
        """What every method's config shares: seed, run directory and the built-in task's settings."""
        return [f"seed={seed}", f"output_dir={where}", f"precision={self.cfg.precision}",
                *(f"builtin.{k}={v}" for k, v in self.cfg.builtin.model_dump().items() if v is not None)]

    def ppo_config(self, where: Path, seed: int, estimator: str, samples: int, extra: list[str] = ()):
        from rlhf_cluster.lib.config import CONFIG_DIR, PPOConfig, load_config

        c = self.cfg
        iterations = samples // (c.prompts_per_iteration * c.samples_per_prompt)
        return load_config(PPOConfig, CONFIG_DIR / "tiny-cpu.yaml", [
            *self.common(where, seed), f"estimator={estimator}", f"iterations={iterations}",
            f"prompts_per_iteration={c.prompts_per_iteration}", f"rollout.samples_per_prompt={c.samples_per_prompt}",
            f"eval_every={max(1, iterations // c.eval_points)}", f"checkpoint_every={iterations}",
            "keep_checkpoints=1", *extra])

    def run(self, method: str, seed: int) -> tuple[Path, dict]:
        """Train `method` from the SFT policy; returns (the HF directory it hands over, what it reported)."""
        from rlhf_cluster import ppo, rejection_sampling
        from rlhf_cluster.lib.config import CONFIG_DIR, DPOConfig, RSConfig, load_config
        from rlhf_cluster.rl.checkpoints import latest_checkpoint

        c, where = self.cfg, self.out / method / f"seed{seed}"
        if method == "sft":
            return self.sft, {}
        log = job_log(where)
        if method.removesuffix("_async") in PPO_FAMILY:
            base = method.removesuffix("_async")
            extra = ["async_rollout.max_staleness=1"] if method.endswith("_async") else []
            summary = ppo.run(self.ppo_config(where, seed, "gae" if base == "ppo" else base, c.samples_per_method,
                                              extra), log=log)
            return latest_checkpoint(where) / "hf", {
                "best_val_iteration": summary["best_val_iteration"], "iterations": summary["iterations"]}
        if method in ("rejection_sampling", "rs_ppo"):
            half = c.samples_per_method // 2
            rounds = ["rejection_sampling", "rejection_sampling"] if method == "rejection_sampling" else \
                ["rejection_sampling", "ppo"]
            ppo_part = self.ppo_config(where, seed, "gae", half)  # the PPO round's keys (rs_ppo)
            cfg = load_config(RSConfig, CONFIG_DIR / "rejection-sampling-tiny.yaml", [
                *self.common(where, seed), f"rounds={json.dumps(rounds)}", "best_of_k_eval=[]",
                f"rs.samples_per_prompt={c.rs_samples_per_prompt}",
                f"rs.prompts_per_round={half // c.rs_samples_per_prompt}", f"iterations={ppo_part.iterations}",
                f"prompts_per_iteration={c.prompts_per_iteration}",
                f"rollout.samples_per_prompt={c.samples_per_prompt}", f"eval_every={ppo_part.eval_every}",
                f"checkpoint_every={ppo_part.iterations}", "keep_checkpoints=1"])
            summary = rejection_sampling.run(cfg, log=log)
            return Path(summary["best_model"]), {"best_round": summary["best_round"]}
        if method in ("dpo", "ipo"):
            from rlhf_cluster.dpo import run_dpo

            cfg = load_config(DPOConfig, CONFIG_DIR / "dpo-tiny.yaml", [
                *self.stage_common(where, seed), "gold_eval=false", f"loss={'sigmoid' if method == 'dpo' else 'ipo'}",
                f"model.path={self.sft}"])
            return run_dpo(cfg), {}
        raise ValueError(f"unknown method {method!r}")

    def sweep(self, size: str, rm: Path) -> dict:
        """PPO at each KL coefficient against the `size` reward model; every evaluation is a point."""
        from rlhf_cluster import ppo

        sw, runs = self.cfg.overoptimisation, []
        for kl_coef in sw.kl_coefs:
            where = self.out / "overoptimisation" / f"rm_{size}" / f"kl{kl_coef:g}"
            per_iteration = self.cfg.prompts_per_iteration * self.cfg.samples_per_prompt
            cfg = self.ppo_config(where, sw.seed, sw.estimator, sw.iterations * per_iteration, [
                f"reward.path={rm}", f"kl_coef={kl_coef}", f"eval_every={sw.eval_every}"])
            t0 = time.time()
            ppo.run(cfg, log=job_log(where))
            rows = [json.loads(line) for line in (where / "metrics.jsonl").read_text().splitlines()]
            evals = [r for r in rows if "test/sampled_kl" in r]
            points = [{"iteration": r["iteration"], "kl": max(0.0, r["test/sampled_kl"]),
                       "proxy": r["test/sampled_rm_score"], "gold": r["test/sampled_gold"],
                       "val_gold": r["val/gold"], "val_rm": r["val/rm_score"]} for r in evals]
            warned = next((r["iteration"] for r in evals if r.get("val/overoptimising")), None)
            runs.append({"kl_coef": kl_coef, "points": points, "warning_at": warned,
                         "seconds": round(time.time() - t0, 1)})
            self.log(f"  over-optimisation rm={size} kl_coef={kl_coef:g}: {len(points)} evaluations, "
                     f"KL {points[-1]['kl']:.2f}, gold {points[0]['gold']:.3f} -> {points[-1]['gold']:.3f}"
                     + (f", warning at iteration {warned}" if warned else ""))
        return {"runs": runs, "fit": overoptimisation_fit(runs)}


def run(cfg: ResultsConfig, quick: bool = False, log=print) -> dict:
    """Every method over every seed, the RM's test accuracy and the over-optimisation sweep; JSON, then report."""
    from rlhf_cluster.lib.builtin import ensure_builtin
    from rlhf_cluster.prerequisites import ensure_builtin_rm, ensure_builtin_sft_and_rm

    started, t_start = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), time.time()
    scaffold.connect(cfg, log_to_driver=False)
    out = Path(cfg.output_dir).resolve()
    results_file = Path(cfg.results_file).resolve() if cfg.results_file else out / "results.json"
    log("built-in SFT policy and reward model (trained first if missing)")
    sft, rm = ensure_builtin_sft_and_rm(cfg.builtin)
    assets = ensure_builtin(cfg.builtin, log=log)
    max_new = 32  # as configs/tiny-cpu.yaml samples
    evaluator = Evaluator(sft, rm, {s: assets.file(f"prompts_{s}.jsonl") for s in ("val", "test")},
                          assets.file("preferences_test.jsonl"), max_new)
    harness = Harness(cfg, sft, rm, log)
    results = {"started": started, "cpu": cpu_name(), "cores": usable_cpus(), "quick": quick,
               "config": cfg.model_dump(mode="json"), "test_prompts": len(evaluator.prompts["test"]),
               "rm_test_accuracy": evaluator.rm_accuracy(), "methods": {}, "overoptimisation": {}}
    log(f"reward model: test-pair accuracy {results['rm_test_accuracy']['accuracy']:.3f}")
    total, done = len(cfg.methods) * len(cfg.seeds), 0
    for method in cfg.methods:
        per_seed = {}
        for seed in cfg.seeds:
            done += 1
            t0 = time.time()
            if method == "best_of_k":  # inference-time: its cost is the sampling and scoring itself
                report, extra = evaluator.best_of_k(cfg.best_of_k, seed), {}
                seconds = time.time() - t0
            else:
                model, extra = harness.run(method, seed)
                seconds = time.time() - t0  # the method's own wall time, not its evaluation
                report = evaluator.evaluate(model, seed)
            report["seconds"] = round(seconds, 1)
            per_seed[str(seed)] = report | extra
            log(f"[{done}/{total}] {method} seed {seed}: test gold {report['test_gold']:.3f} "
                f"± {report['test_gold_se']:.3f}, val gold {report['val_gold']:.3f}, KL {report['kl']:.2f}, "
                f"{report['seconds']:.0f} s  ({(time.time() - t_start) / 60:.1f} min in)")
        results["methods"][method] = {"seeds": per_seed, "aggregate": aggregate(per_seed)}
        write_json(results_file, results | {"duration_s": round(time.time() - t_start)}, indent=1)  # progress survives
    if cfg.overoptimisation:
        for size in cfg.overoptimisation.reward_sizes:
            other = cfg.builtin.model_copy(update={"size": size})
            size_rm = rm if size == cfg.builtin.size else ensure_builtin_rm(other)
            results["overoptimisation"][size] = harness.sweep(size, size_rm)
            write_json(results_file, results | {"duration_s": round(time.time() - t_start)}, indent=1)
    results["duration_s"] = round(time.time() - t_start)
    results["targets"] = targets(results)
    write_json(results_file, results, indent=1)
    report_dir = out / "report"
    figures(results, report_dir / "results")  # where results.md links them, as in docs/
    (report_dir / "results.md").write_text(render_results_md(results))
    if results_file == RECORDED:  # the recorded run: docs/results.md and README follow it
        write_report(results)
    log("\n=== results ===\n" + "\n".join(methods_table(results))
        + f"\nreward model test-pair accuracy: {results['rm_test_accuracy']['accuracy']:.3f}"
        + "".join(f"\nover-optimisation fit ({size} RM): "
                  + (f"alpha {s['fit']['alpha']:.3f}, beta {s['fit']['beta']:.3f}, R² {s['fit']['r2']:.2f}"
                     if s.get("fit") else "too few points") for size, s in results["overoptimisation"].items())
        + f"\nJSON: {results_file}\nreport: {report_dir / 'results.md'} (figures beside it)"
        + f"\n{results['duration_s'] / 60:.1f} min in all")
    return results
