# Every target does its own set-up: a fresh machine needs only python3 and make.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: setup test test-fast test-mesh test-compile main lint bench photos

$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[data,test,peers,hf,lightning]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -m "not mesh"
	$(MAKE) --no-print-directory test-mesh

# 2-D meshes (HSDP, data x tensor parallel) and tensor parallelism on 4 and 2 gloo processes:
# about 2 minutes on the 2-core machine. `make test` runs it after the rest.
test-mesh: $(STAMP)
	$(PY) -m pytest -m mesh

# The quick subset: every test not marked slow (tests/conftest.py marks the ones that start
# processes, compile or train whole comparisons).
test-fast: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -m "not slow"

# torch.compile in full: the aot_eager sweep over every registry name (`make test` runs the
# first name of each family) and inductor for soap and shampoo. Minutes of compiling on CPU
# (docs/benchmarks.md, "torch.compile").
test-compile: $(STAMP)
	SOAPLAB_COMPILE_SWEEP=1 $(PY) -m pytest tests/optim/test_compile.py -s --durations=0

# A fresh comparison each time: --overwrite moves an earlier runs/compare-lm aside (to
# runs/compare-lm.old-<UTC time>) instead of refusing it. Continue a killed run with
# `.venv/bin/soaplab compare lm --ns-dtype float32 --jobs 3 --resume`. Muon's Newton-Schulz
# runs in float32: torch's bfloat16 is emulated on CPUs without native bfloat16, where it made
# Muon alone take 20 minutes (docs/optimizers.md, `muon`). --jobs 3 trains the three runs side
# by side (same losses, bitwise, as one run after another with as many threads each; sooner on
# a small CPU: README, "Results").
main: $(STAMP)
	.venv/bin/soaplab compare lm --ns-dtype float32 --jobs 3 --overwrite

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/step_time.py

# The 46 Debian photos of `soaplab compare colorize --images debian` (apt-get download of three
# packages, about 160 MB; only the photos are kept, in ~/.cache/soaplab/photos-debian).
photos: $(STAMP)
	$(PY) -m soaplab.experiments.data.debian_photos
