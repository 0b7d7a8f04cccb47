"""Per-click latency of the browser client in headless Chromium: browser mode (the decoder in
onnxruntime-web WASM, threads on and off, fp32 and fp16 graphs) against server mode (a request
to `ois-deploy serve`, ONNX Runtime in Python), on ois-tiny; and the state a browser downloads
per image for ois-tiny, ois-s-1024 and ois-b-1024.

    python benchmarks/browser_latency.py [--model artifacts/ois-tiny] [--sessions 4]
        [--screenshot docs/browser.png]

Everything runs on this machine over loopback: `serve` (fp32) on a free port, Chromium from
/usr/bin/chromium through Playwright. Per configuration: a page of its own with the demo image and
one warm-up session; then --sessions rounds of the same 5 clicks, one session per configuration
in turn (so that load from elsewhere falls on all alike); `ms` is what the client measures
per click (server: the HTTP round trip; browser: decoder run plus resizing and RLE), `decoder_ms`
the decoder alone. Sizes: the state from contract.state_shapes, the fp16 decoder graph measured
for ois-tiny and estimated for the 1024 presets as 2 bytes per decoder parameter (counted on the
randomly initialised model: the parameters a decode reaches). Writes
benchmarks/results/browser_latency.json with machine, versions and date.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from ois_deploy.contract import graph_file, is_export_folder, read_manifest, state_shapes
from ois_deploy.errors import run_script
from ois_deploy.presets import get_preset
from ois_deploy.provenance import machine_info, now_utc, tool_versions
from ois_deploy.runtime import ort_web_backend

RESULTS = Path(__file__).parent / "results"
CLICKS = [(122, 188, True), (200, 60, False), (60, 200, True), (240, 230, False), (150, 250, True)]
PREPARE_JS = """async ([clicks, mode, precision, threads]) => {
  const { OisClient } = await import("/ois-client.js");
  const c = new OisClient(location.origin, { precision, threads });
  await c.setImage(await (await fetch("/demo.png")).blob());
  await c.setMode(mode);
  for (const [x, y, p] of clicks) await c.click(x, y, p);  // a warm-up session
  window.bench = c;
  return { threads: c.wasmThreads, isolated: crossOriginIsolated, stateBytes: c.stateBytes, graphBytes: c.graphBytes };
}"""
SESSION_JS = """async (clicks) => {
  const c = window.bench, ms = [], decoder = [];
  c.reset();
  for (const [x, y, p] of clicks) {
    const r = await c.click(x, y, p);
    ms.push(r.ms); decoder.push(r.decoderMs);
  }
  return { ms, decoder };
}"""


def summary(values: list[float]) -> dict:
    a = np.asarray(values, float)
    return {"p50": round(float(np.median(a)), 2), "p95": round(float(np.percentile(a, 95)), 2),
            "mean": round(float(a.mean()), 2), "n": len(values)}


def decoder_params(preset: str) -> int:
    """Parameters of the decoder graph: those a decode reaches (gradients from the logits)."""
    import torch

    from ois_deploy.model.ois import ImageState
    from ois_deploy.model.weights import load_model

    model, _ = load_model(preset, "random")
    s = model.cfg.input_size
    state = ImageState(*(torch.zeros(shape) for shape in state_shapes(model.cfg).values()))
    logits = model.decode(state, torch.tensor([[[s / 2, s / 2]]]), torch.tensor([[1]], dtype=torch.int32),
                          torch.zeros(1, 1, s, s))
    logits.float().sum().backward()
    return sum(p.numel() for p in model.parameters() if p.grad is not None)


def state_sizes(tiny_export: Path) -> list[dict]:
    rows = []
    for preset in ("ois-tiny", "ois-s-1024", "ois-b-1024"):
        shapes = state_shapes(get_preset(preset))
        elements = sum(int(np.prod(s)) for s in shapes.values())
        params = decoder_params(preset)
        row = {"preset": preset, "state_elements": elements, "state_mb_fp32": round(elements * 4 / 1e6, 2),
               "state_mb_fp16": round(elements * 2 / 1e6, 2),
               "largest": max(shapes, key=lambda k: int(np.prod(shapes[k]))),
               "decoder_params": params, "decoder_fp16_mb_estimate": round(params * 2 / 1e6, 2)}
        if preset == "ois-tiny":
            row["decoder_fp16_mb_measured"] = round((tiny_export / graph_file("decoder", "fp16")).stat().st_size / 1e6, 2)
        row["download_mb_fp16"] = round(row["state_mb_fp16"] + row.get("decoder_fp16_mb_measured", row["decoder_fp16_mb_estimate"]), 2)
        rows.append(row)
    return rows


def start_serve(model: Path):
    proc = subprocess.Popen([sys.executable, "-m", "ois_deploy", "serve", str(model), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if match := re.search(r"http://\S+", line):
            return proc, match.group(0)
    raise SystemExit("serve did not start")


def screenshot(browser, url: str, out: Path) -> None:
    """The page as a person uses it: the demo image, browser mode, three clicks with the mouse."""
    page = browser.new_page(viewport={"width": 900, "height": 470})
    page.goto(url + "/")
    page.click("#demo")
    page.wait_for_function("document.getElementById('s-image').textContent !== '–'")
    page.check("input[value=browser]")
    page.wait_for_function("window.ois.mode === 'browser'")
    box = page.locator("#canvas").bounding_box()
    for i, (x, y, positive) in enumerate(CLICKS[:3], start=1):
        page.mouse.click(box["x"] + x + 0.5, box["y"] + y + 0.5, button="left" if positive else "right")
        page.wait_for_function(f"document.getElementById('s-clicks').textContent === '{i}'")
    out.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out))
    page.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="artifacts/ois-tiny", help="ois-tiny export folder (exported if missing)")
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--screenshot", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "browser_latency.json")
    args = parser.parse_args()
    model = Path(args.model)
    if not is_export_folder(model):
        subprocess.run([sys.executable, "-m", "ois_deploy", "export", "--preset", "ois-tiny", "--out", str(model)], check=True)
    if read_manifest(model)["preset"] != "ois-tiny":
        raise SystemExit(f"{model} is not an ois-tiny export")

    from playwright.sync_api import sync_playwright

    configs = [("server", "fp32", 0), ("browser", "fp32", 0), ("browser", "fp32", 1),
               ("browser", "fp16", 0), ("browser", "fp16", 1)]
    rows = []
    load_before = os.getloadavg()[0]  # a shared machine: other work on the cores shows up here
    proc, url = start_serve(model)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=ort_web_backend.CHROMIUM, args=ort_web_backend.CHROMIUM_ARGS)
            pages, info = [], []
            for mode, precision, threads in configs:
                page = browser.new_context().new_page()  # a page of its own: WASM threads are fixed per page
                page.goto(url + "/")
                page.wait_for_function("window.ois !== undefined")
                info.append(page.evaluate(PREPARE_JS, [CLICKS, mode, precision, threads]))
                pages.append(page)
            # Sessions interleaved across the configurations, so that load from elsewhere on the
            # machine falls on all of them alike.
            times = [{"ms": [], "decoder": []} for _ in configs]
            for _ in range(args.sessions):
                for page, t in zip(pages, times):
                    r = page.evaluate(SESSION_JS, CLICKS)
                    t["ms"] += r["ms"]
                    t["decoder"] += r["decoder"]
            for (mode, precision, threads), r, t in zip(configs, info, times):
                row = {"mode": mode, "precision": precision if mode == "browser" else "fp32 (serve)",
                       "wasm_threads": r["threads"] if mode == "browser" else None, "cross_origin_isolated": r["isolated"],
                       "ms": summary(t["ms"]), "decoder_ms": summary(t["decoder"])}
                if mode == "browser":
                    row.update(state_bytes=r["stateBytes"], graph_bytes=r["graphBytes"])
                rows.append(row)
                print(json.dumps(row), flush=True)
            if args.screenshot:
                screenshot(browser, url, args.screenshot)
            version = browser.version
            browser.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    sizes = state_sizes(model)
    for row in sizes:
        print(json.dumps(row))
    versions = {**tool_versions(), "chromium": version,
                "onnxruntime-web": json.loads(Path("package-lock.json").read_text())["packages"]["node_modules/onnxruntime-web"]["version"]}
    result = {"preset": "ois-tiny", "image": "ois_deploy/assets/demo.png (480x360)", "clicks_per_session": len(CLICKS),
              "sessions": args.sessions, "latency": rows, "state": sizes,
              "load_avg_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
              "machine": machine_info(), "versions": versions, "date": now_utc()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_script(main)
