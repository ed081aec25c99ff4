# Everything the project needs is installed from here: a fresh machine runs `make test` or `make demo` directly.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU wheel for development and CI; the GPU image pins its own CUDA build (images/train.Dockerfile).
TORCH_VERSION ?= 2.13.0
EXTRAS ?= s3,wandb,pipeline,dev

.PHONY: install test demo bench lint compile clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[$(EXTRAS)]'
	touch $@

install: $(BIN)/.installed

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider

demo: install
	$(BIN)/python -m dinocell.demo

bench: install
	$(BIN)/python bench/run_all.py

lint: install
	$(BIN)/ruff check dinocell components tests bench pipeline.py
	$(BIN)/hadolint images/*.Dockerfile

compile: install
	$(BIN)/python pipeline.py compile

clean:
	rm -rf $(VENV) demo runs pipeline.yaml
