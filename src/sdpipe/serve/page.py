"""The web page at `/`: choose label (pixel-space class models) or prompt, negative prompt, width and height
(Stable Diffusion models), and seed, steps, sampler and guidance; press Generate, see the images.

Plain HTML and a few lines of JavaScript against the JSON API (`GET /v1/model`, `POST /v1/generate`),
kept as a string here so it ships inside the Python package without package-data settings.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>sdpipe</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 2em; max-width: 60em; }
 label { display: inline-block; margin: 0 1em 0.6em 0; }
 input[type=number] { width: 6em; }
 #images img { width: 64px; height: 64px; image-rendering: pixelated; margin: 4px; border: 1px solid #ccc; }
 #images img.sd { width: auto; height: auto; max-width: 256px; image-rendering: auto; }
 .sd-only { display: none; }
 body.sd .sd-only { display: block; }
 body.sd .label-only { display: none; }
 #prompt, #negative_prompt { width: 40em; }
 #images figure { display: inline-block; margin: 0; text-align: center; font-size: 0.8em; }
 #status { color: #555; margin: 0.6em 0; min-height: 1.2em; }
 #status.error { color: #b00; }
</style>
</head>
<body>
<h1>sdpipe</h1>
<p id="model">loading model information&hellip;</p>
<form id="form">
 <label class="label-only">label <select id="label" name="label"><option value="all">all</option></select></label>
 <div class="sd-only"><label>prompt <input id="prompt" name="prompt" type="text"></label></div>
 <div class="sd-only"><label>negative prompt <input id="negative_prompt" type="text"></label></div>
 <div class="sd-only">
  <label>width <input id="width" name="width" type="number" min="8" step="8"></label>
  <label>height <input id="height" name="height" type="number" min="8" step="8"></label>
 </div>
 <label>images <input id="n" name="n" type="number" min="1" value="8"></label>
 <label>seed <input id="seed" name="seed" type="number" min="0" value="0"></label>
 <label>steps <input id="steps" name="steps" type="number" min="1"></label>
 <label>sampler <select id="sampler" name="sampler"></select></label>
 <label>guidance <input id="guidance" name="guidance" type="number" step="0.1" min="0"></label>
 <label>API key <input id="apikey" type="password" autocomplete="off" placeholder="if the server needs one"></label>
 <button id="generate" type="submit">Generate</button>
</form>
<div id="status"></div>
<div id="images"></div>
<script>
const $ = (id) => document.getElementById(id);
let sd = false;  // a Stable Diffusion model: prompts instead of labels
function status(text, isError) { $("status").textContent = text; $("status").className = isError ? "error" : ""; }
function option(select, value, text) {
  const o = document.createElement("option"); o.value = value; o.textContent = text || value; select.appendChild(o);
}

async function loadModel() {
  const r = await fetch("v1/model");
  if (!r.ok) { status("model not ready yet (" + r.status + "); reload the page in a moment", true); return; }
  const m = await r.json();
  sd = m.takes === "prompt";
  document.body.classList.toggle("sd", sd);
  const size = m.image_size + "x" + m.image_size;
  $("model").textContent = "model " + m.model + " (" + (sd ? m.kind + ", " : "") + size + ")";
  (m.class_names || []).forEach((c) => option($("label"), c));
  m.samplers.forEach((s) => option($("sampler"), s, (m.webui_samplers || {})[s]));
  if (sd) {
    $("width").value = m.defaults.width; $("height").value = m.defaults.height;
    $("width").max = m.limits.max_width; $("height").max = m.limits.max_height;
    $("prompt").maxLength = $("negative_prompt").maxLength = m.limits.max_prompt_chars;
  }
  $("sampler").value = m.defaults.sampler;
  $("steps").value = m.defaults.steps; $("steps").max = m.limits.max_steps;
  $("guidance").value = m.defaults.guidance;
  $("guidance").min = m.limits.guidance_min; $("guidance").max = m.limits.guidance_max;
  $("n").max = m.limits.max_n;
}

async function generate(event) {
  event.preventDefault();
  const body = {
    n: Number($("n").value), seed: Number($("seed").value),
    steps: Number($("steps").value), sampler: $("sampler").value, guidance: Number($("guidance").value),
  };
  if (sd) {
    Object.assign(body, {
      prompt: $("prompt").value, negative_prompt: $("negative_prompt").value,
      width: Number($("width").value), height: Number($("height").value),
    });
  } else {
    body.label = $("label").value;
  }
  const headers = { "Content-Type": "application/json" };
  if ($("apikey").value) headers["Authorization"] = "Bearer " + $("apikey").value;
  status("generating\u2026");
  const r = await fetch("v1/generate", { method: "POST", headers, body: JSON.stringify(body) });
  const data = await r.json().catch(() => ({}));
  if (!r.ok) {
    const d = data.detail;
    const text = Array.isArray(d) ? d.map((e) => e.loc.join(".") + ": " + e.msg).join("; ") : d;
    status("error " + r.status + ": " + text, true);
    return;
  }
  const box = $("images");
  box.replaceChildren();
  for (const im of data.images) {
    const fig = document.createElement("figure");
    const img = document.createElement("img");
    img.src = "data:image/png;base64," + im.png_base64;
    img.alt = (sd ? "prompt " + im.prompt : "label " + im.label) + ", seed " + im.seed;
    img.className = sd ? "generated sd" : "generated";
    const cap = document.createElement("figcaption");
    cap.textContent = (sd ? "" : (im.label ?? "")) + " #" + im.seed;
    fig.append(img, cap);
    box.appendChild(fig);
  }
  status(data.images.length + " images from model " + data.model);
}

$("form").addEventListener("submit", generate);
loadModel();
</script>
</body>
</html>
"""
