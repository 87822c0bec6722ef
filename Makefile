# posebooth: `make repro` runs the pipeline, `make test` runs the tests (the fast tier, under 12 minutes on 2 cores),
# `make test-all` the slow tier that `make test` leaves out (tests marked `slow`: the pipeline runs end to end; CI
# runs both), `make check-locks` checks that every platform's lock installs on every supported Python. Each creates the virtual environment from this machine's
# lock (locks/, see README "Installing") when it is missing or out of date.
# Python 3.10 to 3.13; python3.11 where there is one (PYTHON=/path/to/python picks another).
PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3.13 || command -v python3.10 || command -v python3)
VENV   := .venv
BIN    := $(abspath $(VENV))/bin
# Stage commands in dvc.yaml call `python`: it must be this environment's.
export PATH := $(BIN):$(PATH)

# The lock for this platform; on Linux, LOCK=locks/linux-x86_64-cpu.txt installs the CPU-only torch instead.
# (Windows: see locks/windows-x86_64.txt.)
PLATFORM := $(shell uname -s)-$(shell uname -m)
LOCK_Linux-x86_64 := locks/linux-x86_64.txt
LOCK_Darwin-arm64 := locks/macos-arm64.txt
LOCK ?= $(LOCK_$(PLATFORM))
# One stamp per lock, so that installing another lock (LOCK=...) re-installs.
STAMP := $(VENV)/.installed-$(basename $(notdir $(LOCK)))

.PHONY: repro test test-all lint check-locks world venv clean-venv

venv: $(STAMP)

$(STAMP): $(LOCK) pyproject.toml
	@test -n "$(LOCK)" || { echo "posebooth has no lock for $(PLATFORM): locks/ has Linux x86-64, macOS arm64 and Windows x86-64 (README, Installing)" >&2; exit 1; }
	@test -n "$(PYTHON)" || { echo "no python3.10 to python3.13 found: make PYTHON=/path/to/python" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; v = sys.version_info; (3, 10) <= v[:2] <= (3, 13) or sys.exit(f"posebooth needs Python 3.10 to 3.13, found {v.major}.{v.minor} at {sys.executable}: make PYTHON=/path/to/python3.1x")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# The lock pins the whole environment, so no dependency resolution is needed (--no-deps).
	# It also keeps rtmlib (DWPose) from pulling opencv-python and opencv-contrib-python, which would
	# overwrite opencv-python-headless<5 (the same cv2 module; rtmlib only needs cv2).
	$(BIN)/python -m pip install --quiet --no-deps -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed*
	touch $@

repro: venv
	$(BIN)/dvc repro

test: venv
	$(BIN)/python -m pytest -m "not slow" --durations=15

test-all: venv
	$(BIN)/python -m pytest -m slow -n 2 --dist loadgroup --durations=15

lint: venv
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

# Resolves every lock for its platform and each Python 3.10-3.13 against PyPI (metadata only: no install, no
# wheel downloaded; a few minutes). CHECK_LOCKS_ARGS=--strict also fails on pins that only an unreachable extra
# index serves (the PyTorch CPU index); see `python scripts/check_locks.py --help`.
check-locks: venv
	$(BIN)/python scripts/check_locks.py $(CHECK_LOCKS_ARGS)

# Builds the world's models (posebooth/world/build.py) into world/: the base model then its OpenPose ControlNet on one
# core, the measuring models (CLIP, DINO, pose detector) on the other; commit world/ afterwards
# (tests/test_world_pretrain.py checks it against the recipes and code). One part: posebooth world pretrain --parts pose
world: venv
	$(BIN)/posebooth world pretrain --out world --parts base,controlnet & base=$$!; \
	$(BIN)/posebooth world pretrain --out world --parts clip,dino,pose; judges=$$?; \
	wait $$base && test $$judges -eq 0

clean-venv:
	rm -rf $(VENV)
