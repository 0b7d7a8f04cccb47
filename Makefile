# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# A CPU build of torch; a plain `torch` requirement would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
DEMO_IMAGE := ois_deploy/assets/demo.png

.PHONY: install demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[cpu,export,dev]"
	touch $@

install: $(VENV)/.installed

# The main job: export ois-s-1024 (random weights unless CHECKPOINT=path is given: it says so),
# lint the graphs, verify them with ONNX Runtime against PyTorch, and segment the bundled image.
demo: install
	mkdir -p artifacts
	$(VENV)/bin/ois-deploy export --preset ois-s-1024 $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) --out artifacts/ois-s-1024
	$(VENV)/bin/ois-deploy verify artifacts/ois-s-1024 $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) --json artifacts/verify-ois-s-1024.json
	$(VENV)/bin/ois-deploy predict --backend ort --model artifacts/ois-s-1024 --precision fp16 --image $(DEMO_IMAGE) \
		--click 262,280,+ --click 150,100,- --out artifacts/demo_mask.png --overlay artifacts/demo_overlay.png

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) artifacts
