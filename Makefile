# Two commands: `make demo` runs the main job, `make test` runs the test suite.
# Both set up the project virtual environment first when it is missing or stale.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ats-vit-installed

.PHONY: demo test setup clean imagenet

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@# Fashion-MNIST from Debian's package when apt is there; elsewhere torchvision downloads it.
	test -d /usr/share/datasets/fashion-mnist || ! command -v apt-get >/dev/null || \
		apt-get install -y -q dataset-fashion-mnist || \
		(apt-get update -q && apt-get install -y -q dataset-fashion-mnist) || true
	@# g++ and ninja build the native selection op on first use (without them: a slower twin).
	(command -v g++ && command -v ninja) >/dev/null || ! command -v apt-get >/dev/null || \
		apt-get install -y -q g++ ninja-build || (apt-get update -q && apt-get install -y -q g++ ninja-build)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/ats-vit eval --out runs/eval

# The README's headline: the real ImageNet ViT-Ti and images of ../shared/imagenet (about 45 min on 2 cores).
IMAGENET := ../shared/imagenet
IMAGENET_MODEL := --model vit_tiny_patch16_224 --checkpoint $(IMAGENET)/vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors
imagenet: setup
	$(PY) benchmarks/imagenet.py view runs/imagenet-1100
	$(VENV)/bin/ats-vit ablate $(IMAGENET_MODEL) --data runs/imagenet-1100 --reductions 0.2,0.3,0.4,0.5 \
		--calib-images 128 --batch-size 64 --timing-batch-sizes 1,64 --out docs/imagenet
	$(VENV)/bin/ats-vit viz $(IMAGENET_MODEL) --out docs/imagenet/viz \
		$$(ls $(IMAGENET)/sample-1000/*/* | awk 'NR % 125 == 1')
	$(PY) benchmarks/imagenet.py report docs/imagenet

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
