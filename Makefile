# posebooth: `make repro` runs the pipeline, `make test` runs the tests.
# Both create the virtual environment from requirements.txt when it is missing or out of date.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(abspath $(VENV))/bin
# Stage commands in dvc.yaml call `python`: it must be this environment's.
export PATH := $(BIN):$(PATH)

.PHONY: repro test lint venv clean-venv

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "posebooth needs Python 3.11, found " + sys.version' 
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# requirements.txt pins the whole environment, so no dependency resolution is needed (--no-deps).
	# It also keeps rtmlib (DWPose) from pulling opencv-python and opencv-contrib-python, which would
	# overwrite opencv-python-headless<5 (the same cv2 module; rtmlib only needs cv2).
	$(BIN)/python -m pip install --quiet --no-deps -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

repro: venv
	$(BIN)/dvc repro

test: venv
	$(BIN)/python -m pytest

lint: venv
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean-venv:
	rm -rf $(VENV)
