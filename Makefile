# The two commands of the quick start: `make serve` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 50051
METRICS_PORT ?= 9090
DEMO_BUNDLE := bundles/demo
BUNDLE ?= $(DEMO_BUNDLE)
DEMO_DATA ?= data/synthetic

.PHONY: install test lint-imports protos serve demo-bundle bench-quality bench-load clean

# venv + editable install with test extras; re-run when pyproject.toml changes.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

install: $(BIN)/.installed

test: install lint-imports
	$(BIN)/python -m pytest

# The import layers (pyproject.toml, [tool.importlinter]). lint-imports reads the package from disk: genrec/ links to
# the mapped top-level folders, so it sees the tree an install makes.
lint-imports: install
	$(BIN)/lint-imports

# Regenerate the committed genrec.v1 stubs after editing protos/genrec/v1/*.proto.
protos: install
	$(BIN)/python protos/generate.py

# The demo bundle: synthetic sample -> item vectors, FAISS, semantic IDs -> SFT -> value head (about 2 minutes).
# Each step runs only when its artifact is missing from the manifest (bundles are written atomically, so a listed
# file is a whole one): an interrupted build resumes where it stopped, and a bundle retrained by hand (which drops
# the value head) gets only a new value head.
demo-bundle: | install
	@test -f $(DEMO_BUNDLE)/manifest.json || { $(BIN)/genrec data synth --out $(DEMO_DATA) && \
		$(BIN)/genrec build --data $(DEMO_DATA) --out $(DEMO_BUNDLE) --preset demo; }
	@test -f $(DEMO_DATA)/sequential_data.txt || $(BIN)/genrec data synth --out $(DEMO_DATA)
	@grep -q '"recommender.safetensors"' $(DEMO_BUNDLE)/manifest.json || \
		$(BIN)/genrec train sft --bundle $(DEMO_BUNDLE) --data $(DEMO_DATA)
	@grep -q '"value.safetensors"' $(DEMO_BUNDLE)/manifest.json || \
		$(BIN)/genrec train value --bundle $(DEMO_BUNDLE) --data $(DEMO_DATA)

# Serving another bundle (BUNDLE=...) never triggers the demo build.
serve: install $(if $(filter $(DEMO_BUNDLE),$(BUNDLE)),demo-bundle)
	$(BIN)/genrec serve --bundle $(BUNDLE) --host $(HOST) --port $(PORT) --metrics-port $(METRICS_PORT)

bench-quality: install
	$(BIN)/python benchmarks/quality.py --data ../shared/data/amazon-beauty

bench-load: install demo-bundle
	$(BIN)/python benchmarks/load.py --bundle $(BUNDLE)

clean:
	rm -rf $(VENV) build bundles runs results $(DEMO_DATA)
