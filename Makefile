# mlforce: the README's two commands are `make demo` and `make test`; both set everything up.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= configs/ethanol_xtb.yaml
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PYTHONUNBUFFERED := 1

.PHONY: install test demo data data-molecules water lint format bench bench-setup clean browser

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel of torch first: an open range would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP) browser
	$(PY) -m ruff check .
	# two workers (pytest-xdist): the flow tests wait on subprocesses and servers, and one
	# process kept the 2 cores ~0.8 busy (6:04 serial, 3:30 with two workers; docs/benchmarks.md 26)
	$(PY) -m pytest -q -n 2 --dist loadgroup

# Debian's Chromium for the report's real-browser test (it skips, saying why, without one).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v apt-get >/dev/null 2>&1 && \
	  ( command -v chromium >/dev/null 2>&1 || apt-get install -y -q chromium >/dev/null 2>&1 || \
	    ( apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1 ) || \
	    echo "chromium could not be installed: the report's browser test will skip" ) || true

# Reference data (GFN2-xTB Langevin MD of ethanol) into the git-ignored datasets/ folder.
data: $(STAMP)
	$(VENV)/bin/mlforce generate $(CONFIG) --out datasets

# 300 K xTB test trajectories of the molecules of configs/molecules_xtb.yaml (ethanol's from data).
MOLECULES := configs/molecules_xtb.yaml
data-molecules: $(STAMP)
	@test -f datasets/ethanol_test_300K.extxyz || $(VENV)/bin/mlforce generate $(CONFIG) --test-only --out datasets
	@for m in malonaldehyde aspirin; do test -f datasets/$${m}_test_300K.extxyz || \
	  $(VENV)/bin/mlforce generate $(MOLECULES) --test-only --out datasets \
	    --set data.generate.structure=data/$$m.xyz || exit 1; done

demo: $(STAMP)
	$(VENV)/bin/mlforce demo $(CONFIG)

# Liquid water (configs/water_xtb.yaml): the 32-molecule starting box, built, not shipped.
water: $(STAMP)
	@test -f datasets/water_32.xyz || $(VENV)/bin/mlforce build water --molecules 32 --out datasets/water_32.xyz

# Peer packages for the benchmarks (not needed by mlforce itself).
bench-setup: $(STAMP)
	$(PY) -m pip install -q mace-torch==0.3.16

# The quick benchmarks (a few minutes, after ~20 min to train runs/bench/mc once); see
# docs/benchmarks.md for the long ones.
bench: $(STAMP)
	@test -f datasets/ethanol_train.extxyz || $(VENV)/bin/mlforce generate $(CONFIG) --out datasets
	@test -f runs/bench/mc/model.pt || $(VENV)/bin/mlforce train $(CONFIG) --out runs/bench/mc
	$(PY) benchmarks/uq_cost.py --checkpoint runs/bench/mc --threads 1
	$(PY) benchmarks/md_speed.py --checkpoint runs/bench/mc --threads 1
	$(PY) benchmarks/accuracy.py --checkpoint runs/bench/mc

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
