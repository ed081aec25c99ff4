# Everything the project needs is installed from here: a fresh machine runs `make test` or `make demo` directly.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU wheel for development and CI; the GPU image pins its own CUDA build (images/train.Dockerfile).
TORCH_VERSION ?= 2.13.0
# Where the CPU torch comes from when no local wheel satisfies TORCH_VERSION (pip's find-links): PyTorch's CPU index,
# so a laptop does not download GBs of CUDA wheels for the demo. TORCH_INDEX= (empty) uses pip's default index.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
EXTRAS ?= s3,wandb,pipeline,cellprofiler,dev
# pytest-xdist workers for `make test` (auto: one per core; most tests are single-threaded, so 2 cores halve the
# wall time); TEST_WORKERS=0 runs the suite in this process.
TEST_WORKERS ?= auto

.PHONY: install test demo bench lint compile clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	# A local wheel (find-links) first, offline; its small dependencies then come from the usual index.
	if $(BIN)/pip install --quiet --disable-pip-version-check --no-index --no-deps torch==$(TORCH_VERSION) 2>/dev/null; \
	then $(BIN)/pip install --quiet --disable-pip-version-check torch==$(TORCH_VERSION); \
	else $(BIN)/pip install --quiet --disable-pip-version-check torch==$(TORCH_VERSION) \
		$(if $(TORCH_INDEX),--index-url $(TORCH_INDEX) --extra-index-url https://pypi.org/simple); fi
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[$(EXTRAS)]'
	touch $@

install: $(BIN)/.installed

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadscope

demo: install
	$(BIN)/python pipeline.py demo

bench: install
	$(BIN)/python bench/run_all.py

lint: install
	$(BIN)/ruff check dinocell components tests bench pipeline.py
	$(BIN)/hadolint images/*.Dockerfile

compile: install
	$(BIN)/python pipeline.py compile

clean:
	rm -rf $(VENV) demo runs pipeline.yaml
