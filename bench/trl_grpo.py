"""TRL's GRPOTrainer as a step-by-step contender for bench/rl_step.py (run as a child process).

    python -m bench.trl_grpo SPEC.json

SPEC holds the policy and reward-model directories, the prompts file and the settings. The child
loads everything, prints one JSON line {"event": "ready", ...} on its protocol channel (the
original stdout; everything libraries print goes to stderr), then waits. Each line "go" on stdin
runs exactly one GRPO step (generation with HF `generate`, reference and reward scoring, one
optimiser step) and answers {"event": "step", "seconds": ..., ...}: the wall time from reading
"go" to the end of that step (TRL's `on_step_end`). "stop" ends the training loop and the process.
This lets the parent alternate TRL's steps with its own without either side loading twice.
"""

from __future__ import annotations

import json
import os
import sys
import time

_PROTO = os.fdopen(os.dup(1), "w", buffering=1)  # the protocol channel: the original stdout
os.dup2(2, 1)  # whatever else prints (transformers, accelerate, TRL) goes to stderr
sys.stdout = sys.stderr


def say(**msg) -> None:
    _PROTO.write(json.dumps(msg) + "\n")
    _PROTO.flush()


def main(spec_path: str) -> int:
    spec = json.loads(open(spec_path).read())
    t0 = time.perf_counter()
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(spec["seed"])
    rows = [json.loads(line) for line in open(spec["prompts"]) if line.strip()]
    dataset = Dataset.from_list([{"prompt": r["messages"]} for r in rows])
    n_prompts, n = spec["prompts_per_step"], spec["samples_per_prompt"]
    args = GRPOConfig(
        output_dir=spec["output_dir"], use_cpu=True, bf16=spec.get("dtype") == "bfloat16", fp16=False,
        seed=spec["seed"],
        per_device_train_batch_size=n_prompts * n, gradient_accumulation_steps=1, steps_per_generation=1,
        num_generations=n, num_iterations=1, max_completion_length=spec["max_new_tokens"],
        temperature=spec["temperature"], top_p=1.0, top_k=0, beta=spec["beta"], epsilon=spec["clip_eps"],
        learning_rate=spec["lr"], adam_beta1=spec["betas"][0], adam_beta2=spec["betas"][1],
        adam_epsilon=spec["eps"], weight_decay=spec["weight_decay"], max_grad_norm=spec["grad_clip"],
        lr_scheduler_type="cosine", max_steps=spec["max_steps"], logging_steps=1, save_strategy="no",
        report_to="none", disable_tqdm=True, dataloader_pin_memory=False, shuffle_dataset=False,
        use_vllm=False, model_init_kwargs={"dtype": getattr(torch, spec.get("dtype", "float32"))},
    )

    class Stepper(TrainerCallback):
        """Blocks between steps until the parent says "go"; reports each step's wall time."""

        def __init__(self):
            self.t_go = None
            self.trainer = None

        def _wait(self, control):
            line = sys.stdin.readline().strip()
            if line != "go":
                control.should_training_stop = True
                return control
            self.t_go = time.perf_counter()
            return control

        def on_train_begin(self, args, state, control, **kw):
            return self._wait(control)

        def on_step_end(self, args, state, control, **kw):
            seconds = time.perf_counter() - self.t_go
            m = self.trainer._metrics["train"]
            mean_len = m["completions/mean_length"][-1] if m.get("completions/mean_length") else None
            say(event="step", step=state.global_step, seconds=seconds,
                completion_tokens=None if mean_len is None else mean_len * n_prompts * n,
                mean_completion_length=mean_len,
                kl=(m["kl"][-1] if m.get("kl") else None),
                reward=(m["reward"][-1] if m.get("reward") else None))
            return self._wait(control)

    stepper = Stepper()
    trainer = GRPOTrainer(model=spec["policy"], reward_funcs=spec["reward"], args=args, train_dataset=dataset,
                          callbacks=[stepper])
    stepper.trainer = trainer
    say(event="ready", load_s=time.perf_counter() - t0, torch_threads=torch.get_num_threads(),
        versions={"trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__},
        policy_parameters=sum(p.numel() for p in trainer.model.parameters()),
        reference=trainer.ref_model is not None, generation="transformers generate (use_vllm=False)",
        python=sys.executable)
    trainer.train()
    say(event="done")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
