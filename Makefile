# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# A CPU build of torch; a plain `torch` requirement would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
DEMO_IMAGE := ois_deploy/assets/demo.png

.PHONY: install web label-studio demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_PIN)"
	$(PY) -m pip install --quiet -e ".[cpu,export,train,plot,serve,ray,label-studio,openvino,dev]"
	touch $@

# The browser client's onnxruntime-web, pinned in package-lock.json, copied out of node_modules
# into ois_deploy/web/vendor/ (git-ignored), where `serve` serves it: never from a CDN.
WEB_VENDOR := ois_deploy/web/vendor
ORT_DIST := node_modules/onnxruntime-web/dist
# Without npm this only says so: the page then runs in server mode, and the browser tests skip.
$(WEB_VENDOR)/.installed: package.json package-lock.json
	@if ! command -v npm >/dev/null; then \
		echo "npm not found: the page's browser mode needs it (apt-get install npm, then make web)"; \
	else \
		npm ci --no-audit --no-fund && mkdir -p $(WEB_VENDOR) && \
		cp $(ORT_DIST)/ort.wasm.min.mjs $(ORT_DIST)/ort-wasm-simd-threaded.mjs $(ORT_DIST)/ort-wasm-simd-threaded.wasm $(WEB_VENDOR)/ && \
		touch $@; \
	fi

web: $(WEB_VENDOR)/.installed

# A Label Studio server for tests/test_label_studio.py, in its own venv: it pins Django and many
# other packages that must not meet ours. The tests find it at .venv-label-studio/bin/label-studio.
LABEL_STUDIO_VENV := .venv-label-studio
LABEL_STUDIO_PIN ?= label-studio==1.23.2
$(LABEL_STUDIO_VENV)/.installed:
	$(PYTHON) -m venv $(LABEL_STUDIO_VENV)
	$(LABEL_STUDIO_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LABEL_STUDIO_VENV)/bin/python -m pip install --quiet "$(LABEL_STUDIO_PIN)"
	touch $@

label-studio: $(LABEL_STUDIO_VENV)/.installed

install: $(VENV)/.installed web

# The main job, on the embedded default: ois-tiny with its bundled trained weights. Export the
# graphs, lint them, verify them with ONNX Runtime against PyTorch, and segment the bundled image
# with the FP16 graphs: one positive click on the front red ellipse. Another model:
# make demo PRESET=ois-s-1024 CHECKPOINT=depth_anything_v2_vits.pth
PRESET ?= ois-tiny
DEMO_CLICKS ?= --click 122,188,+
demo: install
	mkdir -p artifacts
	$(VENV)/bin/ois-deploy export --preset $(PRESET) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) --out artifacts/$(PRESET)
	$(VENV)/bin/ois-deploy verify artifacts/$(PRESET) $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT)) --json artifacts/verify-$(PRESET).json
	$(VENV)/bin/ois-deploy predict --backend ort --model artifacts/$(PRESET) --precision fp16 --image $(DEMO_IMAGE) \
		$(DEMO_CLICKS) --out artifacts/demo_mask.png --overlay artifacts/demo_overlay.png

test: install label-studio
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(LABEL_STUDIO_VENV) artifacts node_modules $(WEB_VENDOR)
