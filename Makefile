# Two commands do all the set-up on a fresh machine:  make demo  |  make test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
GLUE_DIR ?= $(abspath ../shared/data/glue)
export GLUE_DIR

# torch is pinned in the install step (a CPU build on these machines); the package itself asks only torch>=2.5.
TORCH_SPEC ?= torch==2.13.0
# Triton, pinned with torch: CPU builds of torch do not bring it, and the tests run its kernel in Triton's interpreter.
TRITON_SPEC ?= triton==3.6.0

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" "$(TRITON_SPEC)"
	$(PY) -m pip install -q -e ".[dev,syntax,model,ray]"
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/sparseattn demo

# Test processes (pytest-xdist): two suit the 2-core, 24 GiB machines CI runs on; each process holds its own torch
# and models, so more want memory as well as cores.
TEST_WORKERS ?= 2

test: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks studies
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) tests

# The papers' studies (issue 7): long; meant for a GPU machine (see studies/README.md).
reproduce: $(VENV)/.installed
	$(VENV)/bin/sparseattn parse --task sst2 mrpc rte cola stsb
	$(VENV)/bin/sparseattn sweep studies/pattern_ablation.yaml
	$(VENV)/bin/sparseattn sweep studies/learned_vs_bigbird_sst2.yaml
	$(VENV)/bin/sparseattn sweep studies/learned_vs_bigbird_small.yaml
	$(VENV)/bin/sparseattn sweep studies/attention_pruning.yaml
	$(VENV)/bin/sparseattn report studies/pattern_ablation.sqlite --out out/reports/pattern_ablation
	$(PY) studies/ablation_summary.py out/reports/pattern_ablation/results.csv --plot out/reports/pattern_ablation/delta_by_pattern.png
	$(VENV)/bin/sparseattn report studies/learned_vs_bigbird_sst2.sqlite --out out/reports/learned_vs_bigbird_sst2
	$(VENV)/bin/sparseattn report studies/learned_vs_bigbird_small.sqlite --out out/reports/learned_vs_bigbird_small
	$(VENV)/bin/sparseattn report studies/attention_pruning.sqlite --out out/reports/attention_pruning
	$(PY) studies/ap_summary.py out/reports/attention_pruning/results.csv --plot out/reports/attention_pruning/metric_vs_sparsity.png

# The suite on the CPU under the GPU image's versions (torch 2.11, transformers 5.17; docs/benchmarks.md), whose
# torch.compile traces differently from the CPU pins': run it before a device session. torch 2.11 comes as its
# CUDA wheel (about 3 GB with its libraries), which runs on a machine without a GPU.
IMAGE_VENV ?= .venv-image
IMAGE_SPECS ?= torch==2.11.0 triton==3.6.0 transformers==5.17.0

$(IMAGE_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(IMAGE_VENV)
	$(IMAGE_VENV)/bin/python -m pip install -q --upgrade pip
	$(IMAGE_VENV)/bin/python -m pip install -q $(IMAGE_SPECS)
	$(IMAGE_VENV)/bin/python -m pip install -q -e ".[dev,model,syntax]" $(IMAGE_SPECS)
	touch $@

test-image: $(IMAGE_VENV)/.installed
	$(IMAGE_VENV)/bin/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) tests

clean:
	rm -rf $(VENV) $(IMAGE_VENV) out runs

.PHONY: install demo test test-image reproduce clean
