// ldm's web page: a form that submits to the job API (/ldm/v1/jobs), follows each job's server-sent
// events (progress, live preview), shows the results with their parameters, and lists the queue.
// Plain JS, no build step, nothing fetched from anywhere but this server (docs/server.md).
"use strict";

const JOBS = "/ldm/v1/jobs";
const QUEUE_POLL_MS = 1000;
const NUMBERS = ["steps", "cfg_scale", "width", "height"]; // empty: the model's choice (null)
const $ = (id) => document.getElementById(id);

const following = new Map(); // job id -> its EventSource, for the jobs this page submitted
const prompts = new Map(); // job id -> its prompt, to name this page's jobs in the queue

// --- talking to the server ---------------------------------------------------------------------

async function call(method, url, body) {
  const options = { method };
  if (body !== undefined) {
    options.headers = { "content-type": "application/json" };
    options.body = JSON.stringify(body);
  }
  const response = await fetch(url, options);
  const data = await response.json().catch(() => null);
  if (!response.ok) throw new Error(explain(response, data));
  return data;
}

// The server's own words: a 422 names the JSON field, a 429 says when to retry (its Retry-After).
function explain(response, data) {
  const detail = data && data.detail;
  let text = response.statusText || "error";
  if (Array.isArray(detail)) {
    text = detail.map((d) => `${d.loc.filter((part) => part !== "body").join(".")}: ${d.msg}`).join("; ");
  } else if (detail) {
    text = detail;
  }
  return `${response.status}: ${text}`;
}

function showError(text) {
  $("error").textContent = text || "";
  $("error").hidden = !text;
}

// --- the form ----------------------------------------------------------------------------------

function fields() {
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    sampler_name: $("sampler_name").value || null,
    scheduler: $("scheduler").value || null,
    seed: $("seed").value === "" ? -1 : Number($("seed").value),
    batch_size: $("batch_size").value === "" ? 1 : Number($("batch_size").value),
  };
  for (const name of NUMBERS) body[name] = $(name).value === "" ? null : Number($(name).value);
  return body;
}

// "Use these settings": an image's parameters (the request fields that make it again) into the form.
function useSettings(parameters) {
  for (const [name, value] of Object.entries(parameters)) {
    if (!$(name)) continue;
    $(name).value = value ?? "";
    if ($(name).selectedIndex === -1) $(name).selectedIndex = 0; // a select without that choice: its first
  }
  $("batch_size").value = 1;
  $("prompt").focus();
}

async function generate(event) {
  event.preventDefault();
  showError(null);
  const body = fields();
  try {
    const job = await call("POST", JOBS, body);
    prompts.set(job.id, body.prompt);
    follow(job.id);
    refreshQueue();
  } catch (error) {
    showError(error.message);
  }
}

async function fillChoices() {
  const [samplers, schedulers, models, options] = await Promise.all([
    call("GET", "/sdapi/v1/samplers"), call("GET", "/sdapi/v1/schedulers"),
    call("GET", "/sdapi/v1/sd-models"), call("GET", "/sdapi/v1/options"),
  ]);
  fillSelect($("sampler_name"), [["", "Default"], ...samplers.map((s) => [s.name, s.name])]);
  fillSelect($("scheduler"), schedulers.map((s) => [s.label, s.label]));
  const titles = models.map((m) => m.title);
  if (!titles.includes(options.sd_model_checkpoint)) titles.unshift(options.sd_model_checkpoint);
  fillSelect($("model"), titles.map((t) => [t, t]));
  $("model").value = options.sd_model_checkpoint;
}

function fillSelect(select, choices) {
  select.replaceChildren(...choices.map(([value, text]) => new Option(text, value)));
}

// A1111's way: choosing a model switches the served one (after the running job).
async function switchModel() {
  const select = $("model");
  select.disabled = true;
  showError(null);
  try {
    await call("POST", "/sdapi/v1/options", { sd_model_checkpoint: select.value });
  } catch (error) {
    showError(error.message);
    select.value = (await call("GET", "/sdapi/v1/options")).sd_model_checkpoint;
  } finally {
    select.disabled = false;
  }
}

// --- a job's progress and results --------------------------------------------------------------

function follow(id) {
  const events = new EventSource(`${JOBS}/${id}/events`);
  following.set(id, events);
  events.addEventListener("progress", (event) => showProgress(JSON.parse(event.data)));
  for (const name of ["done", "failed", "cancelled"]) {
    events.addEventListener(name, (event) => finished(JSON.parse(event.data)));
  }
  events.onerror = () => {
    // A closed stream (401, 404, the server gone) is not retried by the browser; a dropped one is.
    if (events.readyState === EventSource.CLOSED) {
      showError(`lost the progress of job ${id}; the queue below still shows it`);
      stopFollowing(id);
    }
  };
}

function stopFollowing(id) {
  following.get(id)?.close();
  following.delete(id);
  if (following.size === 0) $("progress-area").hidden = true;
}

function showProgress(status) {
  $("progress-area").hidden = false;
  $("progress").value = status.progress;
  const text = status.state === "queued"
    ? `queued: ${status.position} job(s) ahead`
    : `step ${status.step} of ${status.steps}, batch ${status.batch + 1} of ${status.n_iter}`
      + (status.eta_relative ? `, about ${Math.ceil(status.eta_relative)} s left` : "");
  $("progress-text").textContent = text;
  if (status.preview) $("preview").src = `${status.preview}?batch=${status.batch}&step=${status.step}`;
  else if (status.state === "queued") $("preview").removeAttribute("src"); // not the last job's picture
}

function finished(status) {
  stopFollowing(status.id);
  if (status.state === "failed") showError(`job failed: ${status.error}`);
  const results = document.createDocumentFragment();
  status.images.forEach((url, i) => results.append(result(url, status.infotexts[i], status.parameters[i])));
  $("gallery").prepend(results);
  refreshQueue();
}

function result(url, infotext, parameters) {
  const figure = document.createElement("figure");
  figure.className = "result";
  const image = new Image();
  image.src = url;
  image.alt = parameters.prompt;
  const caption = document.createElement("figcaption");
  const seed = paragraph("seed", `Seed: ${parameters.seed}`);
  const prompt = paragraph("prompt", parameters.prompt);
  const info = document.createElement("pre");
  info.className = "infotext";
  info.textContent = infotext;
  const use = document.createElement("button");
  use.type = "button";
  use.className = "use";
  use.textContent = "Use these settings";
  use.addEventListener("click", () => useSettings(parameters));
  caption.append(seed, prompt, info, use);
  figure.append(image, caption);
  return figure;
}

function paragraph(className, text) {
  const p = document.createElement("p");
  p.className = className;
  p.textContent = text;
  return p;
}

// --- the queue ---------------------------------------------------------------------------------

async function refreshQueue() {
  let jobs;
  try {
    jobs = (await call("GET", JOBS)).jobs;
  } catch (error) {
    showError(`the queue: ${error.message}`);
    return;
  }
  const list = $("queue");
  const shown = new Map([...list.children].map((item) => [item.dataset.id, item]));
  jobs.forEach((job, i) => {
    const item = shown.get(job.id) || queueItem(job.id);
    shown.delete(job.id);
    item.dataset.state = job.state;
    item.querySelector(".what").textContent = `${job.state}${job.state === "running" ? ` ${Math.round(job.progress * 100)} %` : ""}: `
      + (prompts.has(job.id) ? JSON.stringify(prompts.get(job.id)) : `job ${job.id.slice(0, 8)}`);
    if (list.children[i] !== item) list.insertBefore(item, list.children[i] || null);
  });
  for (const item of shown.values()) item.remove();
  $("queue-empty").hidden = jobs.length > 0;
}

function queueItem(id) {
  const item = document.createElement("li");
  item.dataset.id = id;
  const what = document.createElement("span");
  what.className = "what";
  const cancel = document.createElement("button");
  cancel.type = "button";
  cancel.className = "cancel";
  cancel.textContent = "Cancel";
  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try {
      await call("DELETE", `${JOBS}/${id}`);
    } catch (error) {
      showError(error.message);
    }
    refreshQueue();
  });
  item.append(what, cancel);
  return item;
}

async function pollQueue() {
  await refreshQueue();
  setTimeout(pollQueue, QUEUE_POLL_MS);
}

// --- start -------------------------------------------------------------------------------------

$("form").addEventListener("submit", generate);
$("model").addEventListener("change", switchModel);
fillChoices().then(() => document.body.classList.add("ready"), (error) => showError(error.message));
pollQueue();
