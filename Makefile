# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Until the search lands: train the base model, prune it 50%, fine-tune briefly, compare.
demo: $(STAMP)
	$(BIN)/hwprune train --model cnn1d --data mnist1d --quiet
	$(BIN)/hwprune apply --model cnn1d --data mnist1d --uniform 0.5 --finetune-steps 300 --out runs/demo/cnn1d-keep50.pt

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache

# Benchmarks that measure (not tests): predictor fidelity on this CPU.
bench: $(STAMP)
	$(BIN)/python bench/predictor_fidelity.py
