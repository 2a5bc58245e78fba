// tierq's HTTP API (docs/http.md) used from Node with the built-in fetch: submit, stream, resume, read.
//
// Environment: TIERQ_NODE_API_URL (http://127.0.0.1:PORT), TIERQ_NODE_API_TOKEN (a bearer token of the
// producer "node"). Prints one JSON line of what it saw; exits 1 when a check fails.

import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { report } from "./report.mjs";

const API = process.env.TIERQ_NODE_API_URL;
const TOKEN = process.env.TIERQ_NODE_API_TOKEN;
const PRODUCER = "node";
/** milliseconds any one request (an event stream included) may take */
const REQUEST_TIMEOUT_MS = 20_000;
const PROBLEM = "application/problem+json";

const DOC = Array.from(
  { length: 40 },
  (_, i) => `Section ${i} of the lease says the tenant repaints room ${i + 1} every ${i + 3} years.`,
).join(" ");

const saw = { ok: false };

function call(path, { method = "GET", body, headers = {}, token = TOKEN, signal } = {}) {
  const all = { ...headers };
  if (token) all.Authorization = `Bearer ${token}`;
  if (body !== undefined) all["Content-Type"] = "application/json";
  return fetch(`${API}${path}`, {
    method,
    headers: all,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal: signal ?? AbortSignal.timeout(REQUEST_TIMEOUT_MS),
  });
}

async function problem(response, status) {
  assert.equal(response.status, status, `expected ${status}, got ${response.status}`);
  assert.equal(response.headers.get("content-type"), PROBLEM);
  const body = await response.json();
  assert.equal(body.status, status);
  assert.ok(body.type && body.title, `not RFC 9457: ${JSON.stringify(body)}`);
  return body;
}

/** Server-sent events of a fetch response, as {id, event, data} with data parsed, until it ends. */
async function* serverSentEvents(response) {
  assert.equal(response.status, 200, `events: HTTP ${response.status}`);
  assert.ok(response.headers.get("content-type").startsWith("text/event-stream"));
  let buffer = "";
  let current = {};
  for await (const chunk of response.body.pipeThrough(new TextDecoderStream())) {
    buffer += chunk;
    let newline;
    while ((newline = buffer.search(/\r\n|\r|\n/)) >= 0) {
      const line = buffer.slice(0, newline);
      buffer = buffer.slice(newline + (buffer.startsWith("\r\n", newline) ? 2 : 1));
      if (line === "") {
        if (current.data !== undefined) yield { ...current, data: JSON.parse(current.data) };
        current = {};
      } else if (!line.startsWith(":")) {
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "data") current.data = current.data === undefined ? value : `${current.data}\n${value}`;
        else if (field === "id" || field === "event") current[field] = value;
      }
    }
  }
}

/** Open a job's event stream (after `lastEventId` when given); read until `stop(events)` or its end. */
async function readEvents(jobId, { lastEventId, stop = () => false } = {}) {
  const abort = new AbortController();
  const signal = AbortSignal.any([abort.signal, AbortSignal.timeout(REQUEST_TIMEOUT_MS)]);
  const headers = lastEventId ? { "Last-Event-ID": lastEventId } : {};
  const events = [];
  const response = await call(`/v1/jobs/${jobId}/events`, { headers, signal });
  let ended = true;
  for await (const event of serverSentEvents(response)) {
    events.push(event);
    if (stop(events)) {
      ended = false;
      abort.abort(); // drop the connection mid-stream, as a client that went away would
      break;
    }
  }
  return { events, ended };
}

/** Stream entry ids (`<ms>-<seq>`) compared as numbers. */
function after(a, b) {
  const [ams, aseq] = a.split("-").map(BigInt);
  const [bms, bseq] = b.split("-").map(BigInt);
  return ams > bms || (ams === bms && aseq > bseq);
}

async function submit(body, key) {
  const response = await call("/v1/jobs", { method: "POST", body, headers: { "Idempotency-Key": key } });
  assert.equal(response.status, 202, `submit: HTTP ${response.status} ${await response.clone().text()}`);
  return { body: await response.json(), location: response.headers.get("location") };
}

async function readJob(jobId) {
  const response = await call(`/v1/jobs/${jobId}`);
  assert.equal(response.status, 200);
  return response.json();
}

async function main() {
  assert.ok(API && TOKEN, "set TIERQ_NODE_API_URL and TIERQ_NODE_API_TOKEN");
  const run = randomUUID().slice(0, 8);

  // health needs no token; /v1 needs one
  const health = await call("/healthz", { token: null });
  assert.equal(health.status, 200);
  assert.deepEqual(await health.json(), { status: "ok" });
  const anonymous = await call(`/v1/jobs/${PRODUCER}.nothing`, { token: null });
  await problem(anonymous, 401);
  assert.match(anonymous.headers.get("www-authenticate") ?? "", /^Bearer/);
  await problem(await call(`/v1/jobs/${PRODUCER}.nothing`, { token: `${TOKEN}x` }), 401);
  saw.auth = "401 without or with a wrong token";

  // submit a streamed job; the same key and request again is the same job
  const key = `sse-${run}`;
  const request = {
    text: DOC,
    urgency: "critical",
    instructions: "Three sentences.",
    max_tokens: 200,
    metadata: { lease: run },
    stream: true,
  };
  const first = await submit(request, key);
  const jobId = `${PRODUCER}.${key}`;
  assert.equal(first.body.job_id, jobId);
  assert.equal(first.body.status, "pending");
  assert.equal(first.body.duplicate, false);
  assert.equal(first.location, `/v1/jobs/${jobId}`);
  const again = await submit(request, key);
  assert.equal(again.body.job_id, jobId);
  assert.equal(again.body.duplicate, true);
  saw.submit = { job_id: jobId, duplicate: again.body.duplicate };

  // read its events until the first text, drop the connection, resume with Last-Event-ID
  const part1 = await readEvents(jobId, { stop: (events) => events.some((e) => e.event === "text") });
  assert.equal(part1.ended, false, `the stream ended before any text: ${JSON.stringify(part1.events)}`);
  const lastId = part1.events.at(-1).id;
  assert.match(lastId, /^\d+-\d+$/);
  const part2 = await readEvents(jobId, { lastEventId: lastId });
  assert.equal(part2.ended, true);
  const events = [...part1.events, ...part2.events];
  const ids = events.map((e) => e.id);
  saw.events = {
    before_reconnect: part1.events.map((e) => e.event),
    after_reconnect: part2.events.map((e) => e.event),
    ids_increasing: ids.every((id, i) => i === 0 || after(id, ids[i - 1])),
    repeated: part2.events.filter((e) => !after(e.id, lastId)).length,
  };
  assert.ok(events.every((e) => e.id), "an event without an id");
  assert.equal(new Set(ids).size, ids.length, `an id came twice: ${ids}`);
  assert.equal(saw.events.repeated, 0, `the resumed stream repeated events up to ${lastId}`);
  assert.ok(saw.events.ids_increasing, `ids not increasing: ${ids}`);
  assert.ok(!events.some((e) => e.event === "restarted"), "an unexpected restart");
  const final = events.at(-1);
  assert.equal(final.event, "result", `the last event: ${JSON.stringify(final)}`);
  assert.ok(events.slice(0, -1).every((e) => e.event === "text"));
  const text = events.filter((e) => e.event === "text").map((e) => e.data.text).join("");
  const result = final.data;
  assert.equal(result.job_id, jobId);
  assert.equal(result.tier, "fast");
  assert.ok(result.summary.trim().length > 0, "the summary is empty");
  assert.equal(text, result.summary, "the text events are not the summary");
  saw.events.text_events = events.length - 1;
  saw.events.summary_chars = result.summary.length;

  // read it: the stream's result event came from the stored result, so it has ended; the same
  // result, with the metadata it was sent with
  const view = await readJob(jobId);
  assert.equal(view.status, "succeeded");
  assert.equal(view.error, null);
  assert.equal(view.result.summary, result.summary);
  assert.equal(view.result.tier, "fast");
  assert.deepEqual(view.result.metadata, { lease: run });
  assert.ok(view.result.timings.queue_wait_ms >= 0, "the API sets the enqueue time: queue wait is known");
  saw.read = { status: view.status, tier: view.result.tier, queue_wait_ms: view.result.timings.queue_wait_ms };

  // a job submitted without streaming sends only its result
  const quiet = await submit({ text: DOC, urgency: "high", max_tokens: 32 }, `quiet-${run}`);
  const quietEvents = await readEvents(quiet.body.job_id);
  assert.deepEqual(quietEvents.events.map((e) => e.event), ["result"]);
  assert.equal(quietEvents.events[0].data.tier, "fast");
  assert.ok(quietEvents.events[0].data.summary.length > 0);
  saw.quiet = { events: quietEvents.events.map((e) => e.event) };

  // refusals: over the tier's cap, a malformed Last-Event-ID, an id that is not ours
  const tooMany = await call("/v1/jobs", { method: "POST", body: { text: DOC, urgency: "high", max_tokens: 4096 } });
  assert.equal((await problem(tooMany, 422)).field, "max_tokens");
  await problem(await call(`/v1/jobs/${jobId}/events`, { headers: { "Last-Event-ID": "yesterday" } }), 422);
  await problem(await call(`/v1/jobs/other.${key}`), 404);
  saw.refused = ["422 max_tokens", "422 Last-Event-ID", "404 another producer's id"];
  saw.ok = true;
}

await report(main, saw);
