# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-e2e bench bench-quality bench-runtimes bench-zoo install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# A real search on the built-in cnn1d/MNIST-1D, priced on this machine's latency table (profiled first
# when no table matches this CPU; ~15 s), trained first if the base model is not cached, under half the
# dense latency; prints the Pareto front, then exports
# the best point (longer fine-tune, real CPU kernels, measured latency, torch.export / ONNX / TorchScript artifacts).
# Running it again resumes the study and prints the stored export.
demo: $(STAMP)
	$(BIN)/hwprune search --spec search/cnn1d-mnist1d-cpu.yaml --out runs/demo-cnn1d
	$(BIN)/hwprune export runs/demo-cnn1d --trial best

# the fast tier, one pytest worker per core (at most 4: each test is small, and more workers only queue on the CPU)
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not e2e" -n auto --maxprocesses 4

# The slow end-to-end tier (~12 min here): every user-model pattern of tests/assets/patterns.py through
# inspect/profile/search/export, the two-node Ray / PostgreSQL cluster tests, kill -9 of a Ray search, two processes
# on one study, Ray against local, search and export in torch.compile; CI runs it after `make test`
test-e2e: $(STAMP)
	$(BIN)/python -m pytest -q -m e2e

clean:
	rm -rf $(VENV) runs .pytest_cache

# Benchmarks that measure (not tests): predictor fidelity (quiet, then beside a noisy neighbour), where the entries'
# error comes from, fused blocks vs bare layers, search throughput (local vs Ray) on this CPU.
bench: $(STAMP)
	$(BIN)/python bench/predictor_fidelity.py
	$(BIN)/python bench/predictor_fidelity.py --neighbour
	$(BIN)/python bench/entry_sum.py
	$(BIN)/python bench/blocks.py --models cnn1d,resnet20,mobilenetv2
	$(BIN)/python bench/search_throughput.py

# Search quality against Torch-Pruning and ModelOpt FastNAS (the bench extra), one report per row set, each
# rewritten after every row; every search method runs 3 search seeds, every chosen model 3 final fine-tunes.
# Measured on 2 cores with 3 x 3 seeds: cnn1d 7.5 min; the GRU at 50% alone 16.7 min. Before (1 search seed, 2 final):
# cnn1d + ResNet-20 30 min; the GRU 13 min, the LSTM 8 min; the LSTM LM 11 min; MobileNetV2 over an hour per budget.
bench-quality: $(STAMP)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev,bench]"
	$(BIN)/pip install --quiet --no-deps torchprofile==0.0.4
	$(BIN)/python bench/search_quality.py
	$(BIN)/python bench/search_quality.py --rows mobilenetv2 --name search_quality_mobilenetv2
	$(BIN)/python bench/search_quality.py --rows rnn --name search_quality_rnn
	$(BIN)/python bench/search_quality.py --rows lm --name search_quality_lm

# The cpu runtimes (eager, torch.compile, ONNX Runtime, OpenVINO f32 and bf16): the dense models side by side
# (~3 min here), predictor fidelity in the ONNX runtimes (cnn1d + GRU, two validations each, ~10 min per runtime),
# one search per runtime for the cnn1d, GRU and LSTM-LM specs (~15 min each)
bench-runtimes: $(STAMP)
	$(BIN)/python bench/runtimes.py --models cnn1d,resnet20,mobilenetv2,lstm,gru,lstm-lm,zoo:crnn
	$(BIN)/python bench/predictor_fidelity.py --runtime onnxruntime --models cnn1d,gru --runs 2
	$(BIN)/python bench/predictor_fidelity.py --runtime openvino --models cnn1d,gru --runs 2
	$(BIN)/python bench/predictor_fidelity.py --runtime openvino-bf16 --models cnn1d,gru --runs 2
	$(BIN)/python bench/runtime_search.py --trials 8
	$(BIN)/python bench/runtime_search.py --trials 8 --spec search/gru-mnist1d-cpu.yaml --name runtime_search_gru
	$(BIN)/python bench/runtime_search.py --trials 8 --spec search/lstm-lm-pydoc-cpu.yaml --name runtime_search_lstm_lm

# The field's model libraries (random weights, nothing downloaded): analysis and a uniform 50% prune of each
# definition, in process. Only CUDA builds of torchvision are on the index and torchaudio's compiled extension is
# CUDA-linked: both install without dependencies (the CPU torch stays) and run as pure Python (bench/zoo.py says
# how); a library that is missing is skipped with the reason.
bench-zoo: $(STAMP)
	$(BIN)/pip install --quiet --no-deps torchvision==0.28.0 timm==1.0.31 torchaudio==2.11.1 speechbrain==1.1.2 \
		opennmt-py==3.5.1
	$(BIN)/pip install --quiet -c constraints.txt huggingface_hub safetensors pyyaml hyperpyyaml ruamel.yaml \
		pyonmttok hydra-core==1.3.2 omegaconf==2.3.0 bitarray sacrebleu
	test -d .zoo/fairseq_fixed-0.12.3.1 || ($(BIN)/pip download --quiet --no-deps \
		fairseq-fixed==0.12.3.1 -d .zoo && tar xzf .zoo/fairseq_fixed-0.12.3.1.tar.gz -C .zoo)
	$(BIN)/python bench/zoo.py
