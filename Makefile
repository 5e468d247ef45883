# Two commands for a fresh machine:
#   make demo   the main job: a small Chameleon-style MoT and its dense twin on captioned images
#   make test   the test suite
# Both create .venv, install the package (torch pinned in constraints.txt) and the Debian
# emoji font on first use. `make setup` does the Python part alone (what a plugin author needs).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
EMOJI_FONT := /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO   := examples/configs/chameleon

.PHONY: demo demo-seeds test install setup clean gpu-kit gpu-check cluster-up cluster-down cluster-demo

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

$(EMOJI_FONT):
	$(SUDO) apt-get install -y -q fonts-noto-color-emoji || \
	  ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q fonts-noto-color-emoji)

setup: $(STAMP)

install: $(STAMP) $(EMOJI_FONT)

demo: install
	$(BIN)/mot data prepare $(DEMO)_mot.yaml
	$(BIN)/mot tokenizer fit $(DEMO)_mot.yaml
	$(BIN)/mot data tokenize $(DEMO)_dense.yaml
	$(BIN)/mot data tokenize $(DEMO)_mot.yaml
	$(BIN)/mot train $(DEMO)_dense.yaml
	$(BIN)/mot train $(DEMO)_mot.yaml
	$(BIN)/mot compare runs/chameleon_dense runs/chameleon_mot --plot runs/chameleon_loss_curves.png

# The main job's spread: seeds 1 and 2 of both models (after `make demo`, which is seed 0), then
# each validation loss's mean and standard deviation over the three seeds (~30 min here).
demo-seeds: demo
	for seed in 1 2; do for model in dense mot; do \
	  $(BIN)/mot train $(DEMO)_$$model.yaml run.seed=$$seed run.dir=runs/chameleon_$${model}_seed$$seed || exit 1; \
	done; done
	$(BIN)/mot compare runs/chameleon_dense runs/chameleon_dense_seed1 runs/chameleon_dense_seed2 \
	  runs/chameleon_mot runs/chameleon_mot_seed1 runs/chameleon_mot_seed2 --seeds

test: install
	$(BIN)/python -m pytest -q

# The GPU check (docs/gpu.md), repository tools in tools/gpu/. Here, once: wheels + data + tokenizers into .gpu-kit/.
gpu-kit: $(STAMP) $(EMOJI_FONT)
	$(BIN)/python -m tools.gpu.kit --out .gpu-kit

# On the CUDA machine (no .venv there: its own python3 with torch); carry .gpu-kit.
GPU_OUT ?= runs/gpu_check
gpu-check:
	python3 -m tools.gpu.check --kit .gpu-kit --out $(GPU_OUT)

# A Ray cluster on this machine: a head and 2 worker nodes that share no files with it, each in
# its own mount namespace (tests/cluster.py; needs root). `up` prints the address for --address.
cluster-up: $(STAMP)
	$(BIN)/python -m tools.cluster up

cluster-down:
	$(BIN)/python -m tools.cluster down

# The cluster chain end to end (tools/cluster/demo.py, a few minutes here): an S3 server and the
# cluster above, then tokenize, launch, eval, generate, export and sweep with everything in the
# bucket, then both torn down.
cluster-demo: $(STAMP)
	$(BIN)/python -m tools.cluster.demo

clean:
	rm -rf $(VENV) runs .pytest_cache
