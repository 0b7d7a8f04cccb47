// OIS click client for `ois-deploy serve` (API v1). An ES module, no build step.
//
//   import { OisClient } from "/ois-client.js";
//   const ois = new OisClient(location.origin, { apiKey });
//   const { imageId, width, height } = await ois.setImage(blob);
//   ois.setMode("browser");                      // or "server" (the default)
//   const { mask, area, ms } = await ois.click(x, y, true);  // also decoderMs, mode
//
// Server mode posts the whole click sequence to /v1/images/{id}/masks. Browser mode downloads the
// image state (/v1/images/{id}/state, safetensors) and the decoder graph once, and runs the
// decoder here with onnxruntime-web (WASM), with the host-side steps of the Python `Predictor`
// (ois_deploy/runtime/predictor.py, preprocess.py): the same click mapping, previous-mask
// feedback, OpenCV-style bilinear resizes and threshold. `mask` is COCO uncompressed RLE in both
// modes, as the server returns it.

const VENDOR = new URL("./vendor/", import.meta.url);
export const ORT_MODULE = "ort.wasm.min.mjs";
export const INSTALL_HINT = "onnxruntime-web is not installed in ois_deploy/web/vendor/: run `make web` " +
  "(npm ci, then copies node_modules/onnxruntime-web/dist files there) and reload";

// ---------------------------------------------------------------------------------------------
// onnxruntime-web, loaded once per page: WASM threads are fixed when the runtime first starts.
let ortPromise = null;

export function loadOrt({ threads = 0 } = {}) {
  if (!ortPromise) {
    ortPromise = (async () => {
      let ort;
      try {
        ort = await import(new URL(ORT_MODULE, VENDOR).href);
      } catch (e) {
        ortPromise = null;
        throw new Error(INSTALL_HINT);
      }
      ort.env.wasm.wasmPaths = VENDOR.href;
      // Threads need SharedArrayBuffer, which needs cross-origin isolation (COOP/COEP headers);
      // without it onnxruntime-web would quietly run on one thread, so say so explicitly.
      const isolated = globalThis.crossOriginIsolated === true;
      const auto = Math.max(1, Math.min(4, navigator.hardwareConcurrency || 1));
      ort.env.wasm.numThreads = isolated ? (threads > 0 ? threads : auto) : 1;
      ort.env.logLevel = "error";
      return ort;
    })();
  }
  return ortPromise;
}

// ---------------------------------------------------------------------------------------------
// safetensors: 8-byte little-endian header length, a JSON header, then the raw tensors.
const DTYPES = { F32: Float32Array, F16: null, I32: Int32Array, I64: BigInt64Array, U8: Uint8Array };

export function parseSafetensors(buffer) {
  const view = new DataView(buffer);
  const length = Number(view.getBigUint64(0, true));
  const header = JSON.parse(new TextDecoder().decode(new Uint8Array(buffer, 8, length)));
  const base = 8 + length;
  const tensors = {};
  for (const [name, info] of Object.entries(header)) {
    if (name === "__metadata__") continue;
    const [begin, end] = info.data_offsets;
    const bytes = buffer.slice(base + begin, base + end); // a copy, so typed arrays are aligned
    let data;
    if (info.dtype === "F16") data = new Float32Array(new Float16Array(bytes));
    else if (info.dtype in DTYPES) data = new DTYPES[info.dtype](bytes);
    else throw new Error(`safetensors dtype ${info.dtype} of ${name} is not supported`);
    tensors[name] = { data, dims: info.shape };
  }
  return { tensors, metadata: header.__metadata__ || {} };
}

// ---------------------------------------------------------------------------------------------
// Geometry, as ois_deploy/runtime/preprocess.py.
const f32 = Math.fround;

function roundHalfEven(v) { // Python's round()
  const r = Math.round(v);
  return Math.abs(v % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
}

export class Frame {
  constructor(height, width, size) {
    Object.assign(this, { height, width, size });
    this.scale = size / Math.max(height, width);
    this.resized = [Math.max(1, roundHalfEven(height * this.scale)), Math.max(1, roundHalfEven(width * this.scale))];
  }

  // Pixel (x, y) of the original image -> the SxS frame, in float32 as numpy computes it.
  toInput(v) {
    const r = f32(f32(f32(v + 0.5) * f32(this.scale)) - 0.5);
    return Math.min(Math.max(r, 0), this.size - 1);
  }
}

// Taps of OpenCV's INTER_LINEAR along one axis (half-pixel centres, edges clamped).
function linearTaps(src, dst) {
  const scale = src / dst;
  const i0 = new Int32Array(dst), i1 = new Int32Array(dst), w = new Float32Array(dst);
  for (let d = 0; d < dst; d++) {
    let f = f32((d + 0.5) * scale - 0.5);
    let s = Math.floor(f);
    f = f32(f - s);
    if (s < 0) { s = 0; f = 0; }
    if (s >= src - 1) { s = src - 1; f = 0; }
    i0[d] = s; i1[d] = Math.min(s + 1, src - 1); w[d] = f;
  }
  return { i0, i1, w };
}

// Bilinear resize of the top-left srcH x srcW of a row-major array with row stride `stride`,
// as cv2.resize(..., INTER_LINEAR) on float32: horizontal pass, then vertical.
export function resizeLinear(src, stride, srcH, srcW, dstH, dstW) {
  const tx = linearTaps(srcW, dstW), ty = linearTaps(srcH, dstH);
  const rows = new Float32Array(srcH * dstW);
  for (let y = 0; y < srcH; y++) {
    const o = y * stride, r = y * dstW;
    for (let x = 0; x < dstW; x++) {
      const a = tx.w[x];
      rows[r + x] = src[o + tx.i0[x]] * (1 - a) + src[o + tx.i1[x]] * a;
    }
  }
  const out = new Float32Array(dstH * dstW);
  for (let y = 0; y < dstH; y++) {
    const b = ty.w[y], r0 = ty.i0[y] * dstW, r1 = ty.i1[y] * dstW, o = y * dstW;
    for (let x = 0; x < dstW; x++) out[o + x] = rows[r0 + x] * (1 - b) + rows[r1 + x] * b;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// COCO uncompressed RLE: runs over the column-major mask, starting with background.
export function encodeRle(mask, height, width) {
  const counts = [];
  let current = 0, run = 0;
  for (let x = 0; x < width; x++) {
    for (let y = 0; y < height; y++) {
      const v = mask[y * width + x];
      if (v !== current) { counts.push(run); run = 0; current = v; }
      run++;
    }
  }
  counts.push(run);
  return { size: [height, width], counts };
}

export function decodeRle(rle) { // -> Uint8Array, row-major
  const [height, width] = rle.size;
  const mask = new Uint8Array(height * width);
  let i = 0, value = 0;
  for (const count of rle.counts) {
    if (value) for (let k = i; k < i + count; k++) mask[(k % height) * width + Math.floor(k / height)] = 1;
    i += count; value ^= 1;
  }
  return mask;
}

// ---------------------------------------------------------------------------------------------
// The decoder graph in onnxruntime-web.
const STATE = ["image_embed", "pyramid_l1", "pyramid_l2", "pyramid_l3", "depth"];

export class BrowserDecoder {
  static async create(graphBytes, { threads = 0 } = {}) {
    const ort = await loadOrt({ threads });
    const session = await ort.InferenceSession.create(graphBytes, {
      executionProviders: ["wasm"], graphOptimizationLevel: "all",
    });
    return new BrowserDecoder(ort, session);
  }

  constructor(ort, session) {
    this.ort = ort;
    this.session = session;
    this.types = Object.fromEntries(session.inputMetadata.map((m) => [m.name, m.type]));
    this.threads = ort.env.wasm.numThreads;
  }

  // {name: {data: Float32Array, dims}} -> tensors in the graph's input types (fp16 graphs take
  // the state in float16, rounded to nearest as numpy's astype does).
  stateTensors(tensors) {
    const out = {};
    for (const name of STATE) {
      const t = tensors[name];
      if (!t) throw new Error(`image state has no ${name}`);
      const type = this.types[name];
      const data = type === "float16" ? new Float16Array(t.data) : Float32Array.from(t.data);
      out[name] = new this.ort.Tensor(type, data, t.dims);
    }
    return out;
  }

  // coords Float32Array [P,N,2] (SxS frame), labels Int32Array [P,N], prev Float32Array
  // [P,1,S,S] -> {data: Float32Array logits [P,1,S',S'], dims}.
  async run(state, coords, labels, prev, P, N, S) {
    const T = this.ort.Tensor;
    const feeds = {
      ...state,
      point_coords: new T("float32", coords, [P, N, 2]),
      point_labels: new T("int32", labels, [P, N]),
      prev_mask: new T("float32", prev, [P, 1, S, S]),
    };
    const out = await this.session.run(feeds);
    const logits = out.mask_logits;
    const result = { data: Float32Array.from(logits.data), dims: logits.dims };
    for (const t of Object.values(out)) t.dispose?.();
    return result;
  }
}

// One decoded click sequence -> the mask at the image size and the probability fed back next,
// as decode_clicks() in predictor.py.
export function postprocess(logits, outSize, frame) {
  const S = frame.size, [h, w] = frame.resized;
  const sxs = resizeLinear(logits, outSize, outSize, outSize, S, S);
  const prev = new Float32Array(S * S); // the padding stays zero
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const v = Math.min(Math.max(sxs[y * S + x], -60), 60);
      prev[y * S + x] = 1 / (1 + Math.exp(-v));
    }
  }
  const image = resizeLinear(sxs, S, h, w, frame.height, frame.width);
  const mask = new Uint8Array(image.length);
  let area = 0;
  for (let i = 0; i < image.length; i++) if (image[i] > 0) { mask[i] = 1; area++; }
  return { mask, area, prev };
}

// ---------------------------------------------------------------------------------------------
export class OisClient {
  constructor(baseUrl = globalThis.location?.origin, { apiKey = null, precision = "fp16", threads = 0 } = {}) {
    this.baseUrl = String(baseUrl).replace(/\/$/, "");
    this.apiKey = apiKey;
    this.precision = precision; // of the decoder graph in browser mode
    this.threads = threads; // WASM threads wanted (0: up to 4 when cross-origin isolated)
    this.mode = "server";
    this.image = null;
    this.clicks = [];
    this.history = []; // per click: {mask, area, ms, prev}
    this.decoder = null;
    this.decoderUrl = null;
    this.stateBytes = 0; // bytes of the image state downloaded in browser mode
    this.graphBytes = 0;
  }

  async _fetch(path, init = {}) {
    const headers = { ...(init.headers || {}) };
    if (this.apiKey) headers.Authorization = `Bearer ${this.apiKey}`;
    const response = await fetch(/^https?:/.test(path) ? path : this.baseUrl + path, { ...init, headers });
    if (!response.ok) {
      let message = `${response.status} ${response.statusText}`;
      try { message = (await response.json()).error || message; } catch { /* not JSON */ }
      throw new Error(`${path}: ${message}`);
    }
    return response;
  }

  async model() {
    if (!this._model) this._model = (await this._fetch("/v1/model")).json();
    return this._model;
  }

  async setImage(blob) {
    const r = await (await this._fetch("/v1/images", { method: "POST", body: blob })).json();
    this.image = { id: r.image_id, width: r.width, height: r.height, encoderMs: r.encoder_ms, state: null };
    this.clicks = [];
    this.history = [];
    if (this.mode === "browser") await this._prepareBrowser();
    return { imageId: r.image_id, width: r.width, height: r.height };
  }

  async setMode(mode) {
    if (mode !== "server" && mode !== "browser") throw new Error(`mode must be "server" or "browser", not ${mode}`);
    if (mode === "browser" && this.image) await this._prepareBrowser();
    this.mode = mode;
    return mode;
  }

  get wasmThreads() { return this.decoder ? this.decoder.threads : null; }

  // The decoder graph once per client, the image state once per image.
  async _prepareBrowser() {
    const model = await this.model();
    const manifest = model.manifest || model;
    const file = Object.entries(manifest?.graphs || {})
      .find(([, g]) => g.role === "decoder" && g.precision === this.precision)?.[0];
    const url = model.decoder_graphs?.[this.precision] ?? (file && `/v1/model/${file}`);
    if (!url) throw new Error(`the served model has no ${this.precision} decoder graph`);
    if (this.decoderUrl !== url) {
      const bytes = await (await this._fetch(url)).arrayBuffer();
      this.graphBytes = bytes.byteLength;
      this.decoder = await BrowserDecoder.create(new Uint8Array(bytes), { threads: this.threads });
      this.decoderUrl = url;
      if (this.image) this.image.state = null;
    }
    const img = this.image;
    if (!img.state) {
      const buffer = await (await this._fetch(`/v1/images/${img.id}/state`)).arrayBuffer();
      this.stateBytes = buffer.byteLength;
      img.state = this.decoder.stateTensors(parseSafetensors(buffer).tensors);
      img.frame = new Frame(img.height, img.width, model.input_size ?? manifest.config.input_size);
    }
  }

  async click(x, y, positive = true) {
    if (!this.image) throw new Error("call setImage() before clicking");
    const { width, height } = this.image;
    if (!(x >= 0 && x < width && y >= 0 && y < height)) {
      throw new Error(`click (${x}, ${y}) is outside the ${width}x${height} image`);
    }
    this.clicks.push([x, y, Boolean(positive)]);
    try {
      const result = this.mode === "browser" ? await this._browserClick() : await this._serverClick();
      this.history.push(result);
      return this.result();
    } catch (e) {
      this.clicks.pop();
      throw e;
    }
  }

  result() {
    const last = this.history[this.history.length - 1];
    if (!last) return null;
    const { mask, area, ms, decoderMs, mode } = last;
    return { mask, area, ms, decoderMs, mode };
  }

  async _serverClick() {
    const start = performance.now();
    const body = { clicks: this.clicks.map(([x, y, positive]) => ({ x, y, positive })), format: "rle" };
    const r = await (await this._fetch(`/v1/images/${this.image.id}/masks`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    })).json();
    return { mask: r.mask, area: r.area, ms: performance.now() - start, decoderMs: r.decoder_ms, mode: "server", prev: null };
  }

  async _browserClick() {
    const start = performance.now();
    await this._prepareBrowser();
    const img = this.image, frame = img.frame, S = frame.size, n = this.clicks.length;
    const coords = new Float32Array(2 * n), labels = new Int32Array(n);
    this.clicks.forEach(([x, y, positive], i) => {
      coords[2 * i] = frame.toInput(x);
      coords[2 * i + 1] = frame.toInput(y);
      labels[i] = positive ? 1 : 0;
    });
    // The previous mask is the last browser-decoded click's; after server-mode clicks, replay.
    let prev = new Float32Array(S * S);
    const last = this.history[this.history.length - 1];
    if (n > 1 && last?.prev) prev = last.prev;
    else if (n > 1) return this._replay(start);
    const decodeStart = performance.now();
    const logits = await this.decoder.run(img.state, coords, labels, prev, 1, n, S);
    const decoderMs = performance.now() - decodeStart;
    const { mask, area, prev: next } = postprocess(logits.data, logits.dims[3], frame);
    return { mask: encodeRle(mask, img.height, img.width), area, ms: performance.now() - start, decoderMs, mode: "browser", prev: next };
  }

  async _replay(start) {
    const clicks = this.clicks;
    this.clicks = []; this.history = [];
    let result;
    for (const c of clicks) { this.clicks.push(c); result = await this._browserClick(); this.history.push(result); }
    this.history.pop(); // click() pushes the last one
    return { ...result, ms: performance.now() - start };
  }

  // Drop the last click; returns the mask of the clicks before it (null when none are left).
  async undo() {
    if (!this.clicks.length) return null;
    this.clicks.pop();
    this.history.pop();
    return this.result();
  }

  reset() {
    this.clicks = [];
    this.history = [];
  }
}
