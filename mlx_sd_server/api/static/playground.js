// The playground: plain JS, no build step, no third-party code. Every request is same-origin and relative
// (works behind a path prefix too) and carries the API key from localStorage as a Bearer token.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "mlx-sd-server.api-key";
let controller = null;  // the running request's AbortController (closing the stream cancels the job)
let painting = null;    // {x, y} while the mouse/pen is down on the mask
let inputs = [];        // the edit's input images (File), in order: the mask paints over the first
let painted = null;     // the File the mask painter shows

function headers(extra) {
  const result = Object.assign({}, extra || {});
  const key = $("api-key").value.trim();
  if (key) result["Authorization"] = "Bearer " + key;
  return result;
}

function setStatus(text, isError) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", !!isError);
}

async function errorMessage(response) {
  let message = response.status + " " + response.statusText;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = response.status + ": " + body.error.message;
  } catch (e) { /* not JSON */ }
  if (response.status === 401) message += " (set the API key at the top right)";
  return message;
}

async function loadModels() {
  const select = $("model");
  try {
    const response = await fetch("v1/models", {headers: headers()});
    if (!response.ok) throw new Error(await errorMessage(response));
    const body = await response.json();
    const previous = select.value;
    select.textContent = "";
    for (const model of body.data) {
      const option = document.createElement("option");
      option.value = model.id;
      option.textContent = modelLabel(model);
      option.title = residency(model);
      if (previous ? model.id === previous : model.default) option.selected = true;
      select.appendChild(option);
    }
    for (const option of select.options) {
      const model = body.data.find((m) => m.id === option.value);
      option.dataset.family = (model && model.family) || "";
      const length = model && model.max_sequence_length;  // models with T5: {default, maximum}
      if (length) {
        option.dataset.t5Default = length.default;
        option.dataset.t5Maximum = length.maximum;
      }
      // what its edits are: instruction edits of up to `references` images, or img2img of one; a mask or not
      option.dataset.references = (model && model.references) || 0;
      option.dataset.inpainting = model && model.inpainting ? "1" : "";
    }
    const memory = body.memory;
    $("memory").textContent = memory && memory.budget_bytes
      ? "In memory: " + bytes(memory.used_bytes) + " of " + bytes(memory.budget_bytes) : "";
    showAdvanced();
    showEditControls();
    if (!select.options.length) setStatus("the server serves no models", true);
    else if ($("status").dataset.models) setStatus("");
    delete $("status").dataset.models;
  } catch (error) {
    setStatus("could not list the models: " + error.message, true);
    $("status").dataset.models = "1";
  }
}

// A model in the picker: its family, and whether it is in memory now (and how much of it it takes).
function modelLabel(model) {
  let text = model.id + (model.family ? " (" + model.family + ")" : "");
  if (model.loaded) text += " ● loaded" + (model.memory_bytes ? ", " + bytes(model.memory_bytes) : "");
  return text;
}

// How long a loaded model stays (keep_alive): kept, in use, or until when; and its size on disk.
function residency(model) {
  let text = model.size_bytes ? bytes(model.size_bytes) + " on disk" : "";
  if (!model.loaded) return text;
  const until = model.expires_at ? "loaded until " + new Date(model.expires_at * 1000).toLocaleTimeString()
    : model.keep_alive === -1 ? "kept loaded" : "loaded (in use)";
  return text ? until + "; " + text : until;
}

function bytes(count) {
  if (count >= 1e9) return (count / 1e9).toFixed(1) + " GB";
  return count >= 1e6 ? (count / 1e6).toFixed(1) + " MB" : Math.round(count / 1e3) + " kB";
}

// The advanced settings the chosen model takes: T5's tokens per prompt on a model with T5 (sent only when set).
function showAdvanced() {
  const chosen = $("model").selectedOptions[0];
  const t5 = !!(chosen && chosen.dataset.t5Maximum);
  const input = $("max-sequence-length");
  $("t5-length").hidden = !t5;
  $("no-advanced").hidden = t5;
  if (!t5) {
    input.value = "";
    return;
  }
  input.max = chosen.dataset.t5Maximum;
  input.placeholder = chosen.dataset.t5Default + " (the model's)";
}

// The LoRAs that fit the chosen model's family (GET v1/loras); picking one adds its tag to the prompt.
async function loadLoras() {
  const select = $("lora");
  const chosen = $("model").selectedOptions[0];
  const family = chosen ? chosen.dataset.family : "";
  while (select.options.length > 1) select.remove(1);
  try {
    const response = await fetch("v1/loras", {headers: headers()});
    if (!response.ok) return;  // the models' status line already says what is wrong
    for (const lora of (await response.json()).data) {
      if (family && lora.family !== family) continue;
      const option = document.createElement("option");
      option.value = option.textContent = lora.id;
      select.appendChild(option);
    }
  } catch (e) { /* offline: no LoRAs to offer */ }
  select.disabled = select.options.length < 2;
}

function addLora() {
  const name = $("lora").value;
  if (!name) return;
  const prompt = $("prompt");
  prompt.value = prompt.value.trimEnd() + " <lora:" + name + ":1>";
  $("lora").value = "";
}

// --- the input images, and the mask painter: a canvas at the first image's own size, laid over it --------

function modelEdits() {
  const chosen = $("model").selectedOptions[0];
  return {references: chosen ? Number(chosen.dataset.references || 0) : 0,
          inpainting: !!(chosen && chosen.dataset.inpainting)};
}

function addImages(files) {
  for (const file of files) {
    if (!file.type || file.type.startsWith("image/")) inputs.push(file);
  }
  showInputs();
}

function showInputs() {
  const list = $("inputs");
  for (const img of list.querySelectorAll("img")) URL.revokeObjectURL(img.src);
  list.textContent = "";
  inputs.forEach((file, index) => {
    const item = document.createElement("li");
    const img = document.createElement("img");
    img.src = URL.createObjectURL(file);
    img.alt = img.title = (index + 1) + ": " + (file.name || "image");
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.title = "remove this image";
    remove.addEventListener("click", () => { inputs.splice(index, 1); showInputs(); });
    item.append(img, remove);
    list.appendChild(item);
  });
  showEditControls();
}

// What the chosen model does with the inputs: the mask painter only where it inpaints, strength only where
// it is meaningful (img2img; an instruction edit has none unless a mask makes it inpainting).
function showEditControls() {
  const {references, inpainting} = modelEdits();
  const limit = Math.max(references, 1);
  const hint = $("inputs-hint");
  hint.hidden = !inputs.length;
  hint.textContent = (references
    ? "Instruction edit: the prompt says what to do with the image" + (references > 1 ? "s (up to " + references + ")" : "")
    : "Image-to-image: this model edits one image") + (inpainting ? "; paint a mask on the first to inpaint." : ".");
  hint.classList.toggle("error", inputs.length > limit);
  if (inputs.length > limit) hint.textContent += " Remove " + (inputs.length - limit) + " of them.";
  if (inpainting && inputs.length) showPainter(inputs[0]);
  else hidePainter();
  const masked = !$("painter").hidden && !!$("mask").dataset.painted;
  $("strength-label").hidden = !!references && !masked;
}

// Shown once the image has loaded (sizing the canvas clears it, so nothing may be painted before).
function showPainter(file) {
  if (painted === file) {  // the same first image: its mask stays
    if ($("source").dataset.loaded) for (const id of PAINTER) $(id).hidden = false;
    return;
  }
  painted = file;
  hidePainter();
  const source = $("source");
  if (source.src) URL.revokeObjectURL(source.src);
  delete source.dataset.loaded;
  source.onload = () => {
    const canvas = $("mask");
    canvas.width = source.naturalWidth;
    canvas.height = source.naturalHeight;
    canvas.dataset.painted = "";
    source.dataset.loaded = "1";
    showEditControls();
  };
  source.src = URL.createObjectURL(file);
}

const PAINTER = ["painter", "mask-hint", "brush-label", "clear-mask"];

function hidePainter() {
  for (const id of PAINTER) $(id).hidden = true;
}

function removeImages() {
  inputs = [];
  painted = null;
  $("image").value = "";
  const source = $("source");
  if (source.src) URL.revokeObjectURL(source.src);
  source.removeAttribute("src");
  delete source.dataset.loaded;
  $("mask").dataset.painted = "";
  showInputs();
}

function clearMask() {
  const canvas = $("mask");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  canvas.dataset.painted = "";
  showEditControls();
}

function canvasPoint(event) {
  const canvas = $("mask");
  const rect = canvas.getBoundingClientRect();
  return {x: (event.clientX - rect.left) * canvas.width / rect.width,
          y: (event.clientY - rect.top) * canvas.height / rect.height,
          scale: canvas.width / rect.width};
}

function paint(event) {
  const canvas = $("mask");
  const point = canvasPoint(event);
  const context = canvas.getContext("2d");
  context.strokeStyle = context.fillStyle = "#ff2060";
  context.lineCap = "round";
  context.lineWidth = Number($("brush").value) * point.scale;
  context.beginPath();
  context.moveTo((painting || point).x, (painting || point).y);
  context.lineTo(point.x, point.y);
  context.stroke();
  canvas.dataset.painted = "1";
  painting = point;
}

// The mask as the API takes it: an opaque PNG of the image's size, white = repaint, black = keep.
function maskBlob() {
  const canvas = $("mask");
  const out = document.createElement("canvas");
  out.width = canvas.width;
  out.height = canvas.height;
  const painted = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
  const pixels = painted.data;
  for (let i = 0; i < pixels.length; i += 4) {
    const value = pixels[i + 3] > 0 ? 255 : 0;
    pixels[i] = pixels[i + 1] = pixels[i + 2] = value;
    pixels[i + 3] = 255;
  }
  out.getContext("2d").putImageData(painted, 0, 0);
  return new Promise((resolve) => out.toBlob(resolve, "image/png"));
}

// --- a request: Server-Sent Events read from the response body ---------------------------------------

function settings() {
  const values = {
    prompt: $("prompt").value,
    model: $("model").value || undefined,
    size: $("size").value.trim() || undefined,
    steps: Number($("steps").value),
    seed: Number($("seed").value),
    n: Number($("n").value),
    stream: true,
    partial_images: Number($("partials").value),
  };
  if ($("negative").value.trim()) values.negative_prompt = $("negative").value;
  if ($("sampler").value) values.sample_method = $("sampler").value;
  const length = $("max-sequence-length").value.trim();
  if (!$("t5-length").hidden && length) values.max_sequence_length = Number(length);
  if ($("hires-on").checked && !inputs.length) {
    values.hr_scale = Number($("hr-scale").value);
    values.hr_upscaler = $("hr-upscaler").value;
    values.hr_strength = Number($("hr-strength").value);
    if (Number($("hr-steps").value)) values.hr_steps = Number($("hr-steps").value);
  }
  return values;
}

// The hires fix's upscalers: the latent modes, then what GET v1/upscalers lists (converted ones first).
const LATENT_MODES = ["latent", "latent-bicubic", "latent-nearest", "latent-nearest-exact"];
let upscalers = [];  // GET v1/upscalers' data

async function loadUpscalers() {
  const select = $("hr-upscaler");
  try {
    const response = await fetch("v1/upscalers", {headers: headers()});
    if (response.ok) upscalers = (await response.json()).data;
  } catch (e) { /* offline: the latent modes only */ }
  upscalers.sort((a, b) => a.built_in - b.built_in);
  select.textContent = "";
  for (const name of [...LATENT_MODES, ...upscalers.map((u) => u.id)]) {
    const option = document.createElement("option");
    option.value = option.textContent = name;
    select.appendChild(option);
  }
}

// What a result's Upscale button uses: the hires upscaler when it is an image upscaler, else the first
// converted one (at its own scale), else Lanczos at 2x.
function upscaleChoice() {
  const picked = upscalers.find((u) => u.id === $("hr-upscaler").value);
  const chosen = picked || upscalers.find((u) => !u.built_in);
  return chosen ? {upscaler: chosen.id, scale: chosen.built_in ? 2 : chosen.scale} : {upscaler: "lanczos", scale: 2};
}

async function upscale(data, values, button) {
  const {upscaler, scale} = upscaleChoice();
  const form = new FormData();
  const format = data.output_format || "png";
  const binary = atob(data.b64_json);
  form.append("image", new Blob([Uint8Array.from(binary, (c) => c.charCodeAt(0))], {type: "image/" + format}),
              "image." + format);
  form.append("upscaler", upscaler);
  form.append("scale", String(scale));
  form.append("response_format", "b64_json");
  button.disabled = true;
  setStatus("upscaling with " + upscaler + " (" + scale + "x)…");
  const started = performance.now();
  try {
    const response = await fetch("v1/images/upscale", {method: "POST", headers: headers(), body: form});
    if (!response.ok) throw new Error(await errorMessage(response));
    const body = await response.json();
    const made = {...body.data[0], output_format: body.output_format || "png", seed: data.seed, task_id: data.task_id};
    showResult(made, values, (performance.now() - started) / 1000, {upscaled: upscaler + " " + scale + "x"});
    setStatus("upscaled");
  } catch (error) {
    setStatus(error.message, true);
  } finally {
    button.disabled = false;
  }
}

async function requestBody(values) {
  if (!inputs.length) return {url: "v1/images/generations", body: JSON.stringify(values), type: "application/json"};
  const masked = !$("painter").hidden && !!$("mask").dataset.painted;
  if (!$("strength-label").hidden) values.strength = Number($("strength").value);
  const form = new FormData();
  for (const [name, value] of Object.entries(values)) {
    if (value !== undefined) form.append(name, String(value));
  }
  // several images as the openai SDK sends a list: one `image[]` part each, in order
  for (const file of inputs) form.append(inputs.length > 1 ? "image[]" : "image", file, file.name || "image.png");
  if (masked) form.append("mask", await maskBlob(), "mask.png");
  return {url: "v1/images/edits", body: form, type: null};
}

// A variation of a result (POST v1/images/variations) with the chosen model and the form's settings, at the
// result's own size: on an img2img model with the prompt that made the image (the server's default strength),
// on an instruction-edit model with the server's own instruction.
function variationBody(values, data) {
  const form = new FormData();
  for (const [name, value] of Object.entries(values)) {
    if (value !== undefined) form.append(name, String(value));
  }
  const binary = atob(data.b64_json);  // (the page may not fetch its data: urls: connect-src 'self')
  const format = data.output_format || "png";
  const blob = new Blob([Uint8Array.from(binary, (c) => c.charCodeAt(0))], {type: "image/" + format});
  form.append("image", blob, (data.task_id || "image") + "-" + (data.image_index || 0) + "." + format);
  return {url: "v1/images/variations", body: form, type: null};
}

function vary(data, made) {
  if (controller) return;
  const values = settings();
  values.size = data.size || made.size;
  values.prompt = modelEdits().references ? undefined : made.prompt || undefined;
  run(values, () => variationBody(values, data), {variation_of: data.task_id});
}

async function* serverSentEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true}).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message", data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) event = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
      }
      if (data.length) yield {event, data: JSON.parse(data.join("\n"))};
    }
  }
}

// Step progress: the task's state, polled by the id this page chose for it (X-Request-Id).
function followTask(taskId, signal) {
  const progress = $("progress");
  let stopped = false;
  const timer = setInterval(async () => {
    try {
      const response = await fetch("v1/images/tasks/" + encodeURIComponent(taskId), {headers: headers(), signal});
      if (!response.ok || stopped) return;  // not queued yet, or already finished
      const task = await response.json();
      if (stopped) return;  // the request ended meanwhile: its own status stands
      if (task.state === "queued") setStatus("queued (position " + task.position + ")");
      else if (task.state === "running" && task.total_steps) {
        progress.max = task.total_steps;
        progress.value = task.step;
        let text = "step " + task.step + " of " + task.total_steps;
        if (task.eta_seconds != null) text += ", about " + Math.ceil(task.eta_seconds) + " s left";
        setStatus(text);
      }
    } catch (e) { /* aborted or offline: the stream reports it */ }
  }, 400);
  return () => { stopped = true; clearInterval(timer); };
}

function showPartial(data) {
  const view = $("partials-view");
  const img = document.createElement("img");
  img.src = "data:image/" + (data.output_format || "png") + ";base64," + data.b64_json;
  img.alt = "partial image " + data.partial_image_index;
  img.title = "partial " + data.partial_image_index + " of image " + (data.image_index || 0);
  view.appendChild(img);
}

function showResult(data, values, seconds, note) {
  const card = document.createElement("div");
  card.className = "result";
  const img = document.createElement("img");
  img.className = "result-image";
  img.src = "data:image/" + (data.output_format || "png") + ";base64," + data.b64_json;
  img.alt = values.prompt;
  const link = document.createElement("a");
  link.href = img.src;
  link.download = (data.task_id || "image") + "-" + (data.image_index || 0) + "." + (data.output_format || "png");
  link.appendChild(img);
  const shown = {...note, prompt: values.prompt, negative_prompt: values.negative_prompt, model: values.model,
                 size: data.size || values.size, steps: values.steps, sample_method: values.sample_method || "(default)",
                 seed: data.seed, strength: values.strength, max_sequence_length: values.max_sequence_length,
                 hires: values.hr_scale && values.hr_scale + "x " + values.hr_upscaler + ", strength " + values.hr_strength,
                 task_id: data.task_id, seconds: seconds.toFixed(1)};
  const pre = document.createElement("pre");
  pre.textContent = Object.entries(shown).filter(([, v]) => v !== undefined && v !== "")
    .map(([k, v]) => k + ": " + v).join("\n");
  const variation = document.createElement("button");
  variation.type = "button";
  variation.className = "variation";
  variation.textContent = "Variation";
  variation.title = "a variation of this image with the chosen model (POST /v1/images/variations)";
  variation.addEventListener("click", () => vary(data, values));
  const enlarge = document.createElement("button");
  enlarge.type = "button";
  enlarge.className = "upscale";
  enlarge.textContent = "Upscale";
  enlarge.title = "enlarge this image (POST /v1/images/upscale) with the hires upscaler if it is an image " +
    "upscaler, else the first converted one, else Lanczos 2x";
  enlarge.addEventListener("click", () => upscale(data, values, enlarge));
  card.append(link, variation, enlarge, pre);
  $("results").prepend(card);
}

async function generate(event) {
  event.preventDefault();
  if (controller) return;
  const values = settings();
  await run(values, () => requestBody(values), {});
}

// One request, streamed: `build` makes its {url, body, type}; `note` is shown with each result's settings.
async function run(values, build, note) {
  const taskId = "pg-" + Date.now().toString(36) + Math.random().toString(36).slice(2, 10);
  controller = new AbortController();
  $("generate").disabled = true;
  $("cancel").disabled = false;
  $("partials-view").textContent = "";
  const progress = $("progress");
  progress.hidden = false;
  progress.removeAttribute("value");  // indeterminate until the task reports steps
  setStatus("sending…");
  const started = performance.now();
  const stopFollowing = followTask(taskId, controller.signal);
  let completed = 0;
  try {
    const {url, body, type} = await build();
    const extra = {"X-Request-Id": taskId, "Accept": "text/event-stream"};
    if (type) extra["Content-Type"] = type;
    const response = await fetch(url, {method: "POST", headers: headers(extra), body, signal: controller.signal});
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const {event: name, data} of serverSentEvents(response)) {
      if (name.endsWith(".partial_image")) showPartial(data);
      else if (name.endsWith(".completed")) {
        completed += 1;
        showResult(data, values, (performance.now() - started) / 1000, note);
      } else if (name === "error") throw new Error((data.error && data.error.message) || "the job failed");
    }
    if (!completed) throw new Error("the stream ended without an image");
    setStatus("done: " + completed + " image" + (completed > 1 ? "s" : "") + " in " +
              ((performance.now() - started) / 1000).toFixed(1) + " s");
  } catch (error) {
    setStatus(error.name === "AbortError" ? "cancelled" : error.message, error.name !== "AbortError");
  } finally {
    stopFollowing();
    progress.hidden = true;
    controller = null;
    $("generate").disabled = false;
    $("cancel").disabled = true;
    loadModels();  // which models the job loaded (or unloaded to make room)
  }
}

function init() {
  const key = $("api-key");
  key.value = localStorage.getItem(KEY_STORAGE) || "";
  key.addEventListener("change", () => {
    if (key.value.trim()) localStorage.setItem(KEY_STORAGE, key.value.trim());
    else localStorage.removeItem(KEY_STORAGE);
    loadModels().then(loadLoras).then(loadUpscalers);
  });
  $("model").addEventListener("change", loadLoras);
  $("model").addEventListener("change", showAdvanced);
  $("model").addEventListener("change", showEditControls);
  $("lora").addEventListener("change", addLora);
  $("hires-on").addEventListener("change", () => { $("hires-settings").hidden = !$("hires-on").checked; });
  $("form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", () => controller && controller.abort());
  $("image").addEventListener("change", () => {
    addImages($("image").files);
    $("image").value = "";  // (the next choice adds to these, and may add the same file again)
  });
  const edit = $("edit");  // drag and drop of image files anywhere on the edit box
  edit.addEventListener("dragover", (e) => { e.preventDefault(); edit.classList.add("dropping"); });
  edit.addEventListener("dragleave", () => edit.classList.remove("dropping"));
  edit.addEventListener("drop", (e) => {
    e.preventDefault();
    edit.classList.remove("dropping");
    addImages(e.dataTransfer.files);
  });
  $("remove-image").addEventListener("click", removeImages);
  $("clear-mask").addEventListener("click", clearMask);
  const canvas = $("mask");
  canvas.addEventListener("pointerdown", (e) => { canvas.setPointerCapture(e.pointerId); painting = null; paint(e); });
  canvas.addEventListener("pointermove", (e) => { if (painting) paint(e); });
  const stop = () => { if (painting) showEditControls(); painting = null; };
  canvas.addEventListener("pointerup", stop);
  canvas.addEventListener("pointercancel", stop);
  loadModels().then(loadLoras).then(loadUpscalers);
}

document.addEventListener("DOMContentLoaded", init);
