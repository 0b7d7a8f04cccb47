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

demo: install
	mkdir -p artifacts
	$(VENV)/bin/ois-deploy info --preset ois-s-1024
	$(VENV)/bin/ois-deploy predict --preset ois-s-1024 --image $(DEMO_IMAGE) \
		--click 262,280,+ --click 150,100,- --out artifacts/demo_mask.png --overlay artifacts/demo_overlay.png

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) artifacts
