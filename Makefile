# The two commands of the README: `make demo` (the main job on the embedded defaults) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
SAMPLE ?= vnp_core/data/example.fasta
HOME_DIR ?= vnp_home

.PHONY: install demo test ui

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# Keep a torch the user already has (e.g. a CUDA build); otherwise take 2.13.0.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/vnp run $(SAMPLE) --home $(HOME_DIR)

test: install
	$(PY) -m pytest -q

# The web UI on the same instance as `make demo`; FASTA files dropped in $(HOME_DIR)/inbox become samples.
ui: install
	mkdir -p $(HOME_DIR)/inbox
	test -f $(HOME_DIR)/dagster.yaml || cp dagster.yaml $(HOME_DIR)/dagster.yaml
	DAGSTER_HOME=$(abspath $(HOME_DIR)) $(VENV)/bin/dagster dev -w workspace.yaml
