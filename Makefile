# `make test` creates .venv if absent, installs genfast with its dev extras into it, and runs the whole test suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.genfast-installed

.PHONY: test install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# pip's isolated build cannot import torch, so `pip install -e .` leaves out the C++ extension; the second install
# builds it against the venv's torch (without it, the first use compiles it just-in-time).
$(STAMP): $(PY) setup.py
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[dev]"
	MAX_JOBS=2 $(PY) -m pip install --no-build-isolation --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests -n 2 --dist loadgroup -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# `make demo`: the β-VAE experiment on the built-in procedural faces, sized for ~10 minutes on a 2-core CPU: trains a
# VAE (β=1) and a β-VAE (β=4) and writes reconstructions, 16 random faces, 8-step interpolations per model and the
# measured comparison (report.md: reconstruction excess over the data's entropy floor, KL, active units, MIG, which
# latent carries each face factor; side-by-side pictures) under runs/demo/. SEEDS=N repeats each β over N seeds and
# reports mean ± spread (N times the time).
.PHONY: demo
demo: $(STAMP)
	$(PY) -m genfast compare-beta --betas 1 4 --dataset faces --num-samples 10000 --holdout 512 --image-size 64 \
		--latent-dim 32 --batch-size 64 --epochs 15 $(if $(SEEDS),--seeds $(SEEDS)) --out runs/demo

# `make gpu-check`: one GPU validation run with the machine's own $(PYTHON) — no venv, nothing downloaded: an
# offline editable install with the CUDA extension (MAX_JOBS = the cores), TRITON_INTERPRET=0, tests/test_gpu.py,
# the bench's GPU set, the static predictions next to the measured times; stages in order of value, each under its
# own timeout, the whole within 8 minutes; results in bench/results/<gpu>-<date>/ (README "GPU validation").
# DRY_RUN=1: the same stages on the CPU with tiny shapes, into a temporary folder (CI: tests/test_gpu_check.py).
# GPU_CHECK_OUT=DIR writes elsewhere; GPU_CHECK_ARGS passes more options (python -m bench.gpu_check --help).
.PHONY: gpu-check
gpu-check:
	$(PYTHON) -m bench.gpu_check $(if $(filter 1,$(DRY_RUN)),--dry-run) \
		$(if $(GPU_CHECK_OUT),--out $(GPU_CHECK_OUT)) $(GPU_CHECK_ARGS)

# `make compare`: the three families (and latent diffusion) trained on the same built-in faces under one budget
# each and measured side by side — quality, diversity, sampling speed, training cost, controllability — sized for
# ≤ 25 minutes on a 2-core CPU; report.md, sample grids and families.json under runs/compare/.
.PHONY: compare
compare: $(STAMP)
	$(PY) -m genfast compare-families --out runs/compare

# `make gpu-stack`: the GPU machine's stack (Python 3.12, torch 2.11, Triton 3.6, numpy 2.5; no diffusers) in
# .venv-gpu-stack on this CPU machine: gpu-check's offline install, `make gpu-check DRY_RUN=1`, the static quick
# report and the CPU suite, logged to bench/results/gpu-stack-<date>.log (.ci/gpu-stack; 17-22 minutes on 2 cores with the
# extension built before, about 30 with its first CUDA build). GPU_STACK_VENV=DIR puts the venv elsewhere.
.PHONY: gpu-stack
gpu-stack:
	bash .ci/gpu-stack
