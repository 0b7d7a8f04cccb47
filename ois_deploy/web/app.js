// The annotation page: open or drop an image, click, see the mask. `window.ois` is the client.
import { OisClient, ORT_MODULE, INSTALL_HINT, decodeRle } from "./ois-client.js";

const $ = (id) => document.getElementById(id);
const canvas = $("canvas"), ctx = canvas.getContext("2d");
// An API key may be given in the fragment (#key=...), which is never sent to the server.
const key = new URLSearchParams(location.hash.slice(1)).get("key");
const ois = new OisClient(location.origin, { apiKey: key });
window.ois = ois;

let bitmap = null, overlay = null;

function show(text, info = false) {
  $("message").textContent = text || "";
  $("message").className = info ? "info" : "";
}

function maskCanvas(rle) {
  const [h, w] = rle.size, mask = decodeRle(rle);
  const c = new OffscreenCanvas(w, h), g = c.getContext("2d"), img = g.createImageData(w, h);
  for (let i = 0; i < mask.length; i++) {
    if (mask[i]) img.data.set([30, 144, 255, 120], 4 * i);
  }
  g.putImageData(img, 0, 0);
  return c;
}

function draw() {
  if (!bitmap) return;
  ctx.drawImage(bitmap, 0, 0);
  if (overlay) ctx.drawImage(overlay, 0, 0);
  const r = Math.max(3, Math.round(Math.max(canvas.width, canvas.height) / 120));
  for (const [x, y, positive] of ois.clicks) {
    ctx.beginPath();
    ctx.arc(x + 0.5, y + 0.5, r, 0, 2 * Math.PI);
    ctx.fillStyle = positive ? "#1db31d" : "#e01b1b";
    ctx.fill();
    ctx.lineWidth = Math.max(1, r / 3);
    ctx.strokeStyle = "#fff";
    ctx.stroke();
  }
}

function update(result) {
  overlay = result ? maskCanvas(result.mask) : null;
  draw();
  $("s-clicks").textContent = ois.clicks.length;
  $("s-mode").textContent = ois.mode;
  if (result) {
    $("s-ms").textContent = `${result.ms.toFixed(1)} ms (${result.mode})`;
    $("s-area").textContent = `${result.area} px`;
  } else {
    $("s-area").textContent = "–";
  }
  $("s-threads").textContent = ois.wasmThreads ?? (crossOriginIsolated ? "not loaded" : "1 (not cross-origin isolated)");
  $("s-state").textContent = ois.mode === "browser" && ois.stateBytes
    ? `${(ois.stateBytes / 1e6).toFixed(2)} MB (+ graph ${(ois.graphBytes / 1e6).toFixed(2)} MB)` : "–";
  $("undo").disabled = $("reset").disabled = !ois.clicks.length;
}

async function busy(work) {
  document.body.style.cursor = "progress";
  try {
    return await work();
  } catch (e) {
    show(e.message);
  } finally {
    document.body.style.cursor = "";
  }
}

async function openImage(blob) {
  await busy(async () => {
    show("encoding…", true);
    const info = await ois.setImage(blob);
    bitmap = await createImageBitmap(blob, { imageOrientation: "from-image" });
    canvas.width = info.width;
    canvas.height = info.height;
    $("hint").hidden = true;
    $("s-image").textContent = `${info.width}x${info.height}`;
    show("");
    update(null);
  });
}

// Where the pointer is, in image pixels (the canvas may be shown scaled).
function imagePoint(event) {
  const rect = canvas.getBoundingClientRect();
  const x = ((event.clientX - rect.left) * canvas.width) / rect.width;
  const y = ((event.clientY - rect.top) * canvas.height) / rect.height;
  return [Math.min(canvas.width - 1, Math.max(0, Math.floor(x))), Math.min(canvas.height - 1, Math.max(0, Math.floor(y)))];
}

canvas.addEventListener("contextmenu", (e) => e.preventDefault());
canvas.addEventListener("mousedown", async (event) => {
  if (!bitmap || (event.button !== 0 && event.button !== 2)) return;
  const [x, y] = imagePoint(event);
  const positive = event.button === 0 && !event.shiftKey;
  await busy(async () => update(await ois.click(x, y, positive)));
});

$("file").addEventListener("change", (e) => e.target.files[0] && openImage(e.target.files[0]));
$("demo").addEventListener("click", async () => openImage(await (await fetch("demo.png")).blob()));
$("undo").addEventListener("click", async () => busy(async () => update(await ois.undo())));
$("reset").addEventListener("click", () => { ois.reset(); update(null); });
for (const radio of document.querySelectorAll("input[name=mode]")) {
  radio.addEventListener("change", () => busy(async () => {
    if (ois.mode === radio.value) return;
    if (radio.value === "browser") show("loading the decoder and the image state…", true);
    await ois.setMode(radio.value);
    show("");
    update(ois.result());
  }));
}

const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("dragover"); });
drop.addEventListener("dragleave", () => drop.classList.remove("dragover"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("dragover");
  const file = e.dataTransfer.files[0];
  if (file) openImage(file);
});

// Browser mode needs the vendored onnxruntime-web; say how to install it when it is missing.
fetch(new URL(`vendor/${ORT_MODULE}`, import.meta.url), { method: "HEAD" }).then((r) => {
  if (!r.ok) {
    show(`Browser mode unavailable: ${INSTALL_HINT}.`);
    document.querySelector("input[value=browser]").disabled = true;
  }
});
update(null);
