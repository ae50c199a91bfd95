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
# `make ui HOST=0.0.0.0 PORT=3000 POSTGRES_URL=postgresql://user:password@host:5432/db` (a home keeps the storage it
# was made with: a different POSTGRES_URL for an existing home is refused with what to do).
# The home is prepared by vnp_assets/instance.py (dagster.yaml, inbox, the gpu pool sized); dagster dev runs
# in the home (so the repository's dagster.yaml template is not taken for a misplaced instance file), and
# Ctrl-C stops it with everything it started.
HOST ?= 127.0.0.1
PORT ?= 3000
POSTGRES_URL ?=
ui: install
	@$(PY) -m vnp_assets.instance $(HOME_DIR) $(if $(POSTGRES_URL),--postgres-url '$(POSTGRES_URL)')
	@echo "Dagster UI: http://$(HOST):$(PORT) (Ctrl-C stops it); drop FASTA files into $(abspath $(HOME_DIR))/inbox"
	@cd $(HOME_DIR) && exec env DAGSTER_HOME=$(abspath $(HOME_DIR)) $(if $(VNP_SETTINGS),VNP_SETTINGS=$(abspath $(VNP_SETTINGS))) \
	    PYTHONWARNINGS='ignore:Function `dev_command` is superseded' \
	    $(abspath $(VENV))/bin/dagster dev -h $(HOST) -p $(PORT) -w $(abspath workspace.yaml)
