// tierq jobs sent straight to the broker from Node with celery-node, following docs/contract.md alone.
//
// Environment: TIERQ_NODE_BROKER_URL (a Redis URL: broker and result backend, no key prefix),
// TIERQ_NODE_JOB_PREFIX (job ids start with it, so the caller can find and delete what this run made).
// Prints one JSON line of what it saw; exits 1 when a check fails.
//
// Results are read with celery-node's own AsyncResult (it polls `celery-task-meta-<id>`); the token
// stream `tierq:tokens:<id>` and the raw `celery-task-meta-<id>` entries are read with plain Redis (ioredis).
// sendTask writes no tierq_* header; two jobs get them through celery-node's public
// createTaskMessage/sendTaskMessage instead (no patch needed).

import assert from "node:assert/strict";

import celery from "celery-node";
import Redis from "ioredis";
import { report } from "./report.mjs";

const BROKER_URL = process.env.TIERQ_NODE_BROKER_URL;
const PREFIX = process.env.TIERQ_NODE_JOB_PREFIX;
const TASK = "tierq.summarize";
const QUEUE = "tierq.fast";
/** milliseconds one job may take, queue wait included */
const JOB_TIMEOUT_MS = 20_000;
/** milliseconds between two reads of a result (celery-node's default is 500) */
const POLL_MS = 50;

const DOC = Array.from(
  { length: 30 },
  (_, i) => `Clause ${i} of the contract says the carrier delivers every parcel within ${i + 2} days.`,
).join(" ");

const saw = { ok: false };

/** Send a tierq job the way docs/contract.md says: task name, the tier's queue, kwargs {job}, id = job_id. */
function send(client, job, args = []) {
  return client.sendTask(TASK, args, { job }, job.job_id);
}

/** The same, with tierq's optional headers, through celery-node's public createTaskMessage/sendTaskMessage. */
function sendWithHeaders(client, job, headers) {
  const message = client.createTaskMessage(job.job_id, TASK, [], { job });
  Object.assign(message.headers, headers);
  client.sendTaskMessage(TASK, message);
}

/** The job's outcome as celery-node reports it: {status: "SUCCESS", result} or {status, exc_type, exc_message}. */
async function outcome(client, jobId) {
  try {
    const result = await client.asyncResult(jobId).get(JOB_TIMEOUT_MS, POLL_MS);
    return { status: "SUCCESS", result };
  } catch (error) {
    // celery-node rejects with the status as the message, the stored result's fields assigned to it
    return { status: error.message, exc_type: error.exc_type, exc_message: error.exc_message };
  }
}

/** The raw result-backend entry: what a client without celery-node would read. */
async function rawMeta(redis, jobId) {
  const text = await redis.get(`celery-task-meta-${jobId}`);
  return text === null ? null : JSON.parse(text);
}

/** A streamed job's entries read with XREAD from 0 until its end marker, the way docs/contract.md says. */
async function readStream(redis, jobId) {
  const key = `tierq:tokens:${jobId}`;
  const deadline = Date.now() + JOB_TIMEOUT_MS;
  const ids = [];
  let last = "0";
  let run = null;
  let text = "";
  let chunks = 0;
  let restarts = 0;
  while (Date.now() < deadline) {
    const block = Math.max(1, Math.min(1000, deadline - Date.now()));
    const reply = await redis.xread("BLOCK", block, "COUNT", 512, "STREAMS", key, last);
    if (!reply) continue;
    for (const [id, flat] of reply[0][1]) {
      last = id;
      ids.push(id);
      const fields = {};
      for (let i = 0; i < flat.length; i += 2) fields[flat[i]] = flat[i + 1];
      if ("end" in fields) return { end: fields.end, text, chunks, restarts, ids };
      assert.ok("t" in fields && "a" in fields, `stream entry ${id} is neither text nor end: ${JSON.stringify(fields)}`);
      if (run !== null && fields.a !== run) {
        // a later run started over from the top: drop the earlier run's text (docs/contract.md, Streaming)
        restarts += 1;
        text = "";
      }
      run = fields.a;
      text += fields.t;
      chunks += 1;
    }
  }
  assert.fail(`no end marker on ${key} within ${JOB_TIMEOUT_MS} ms (read ${ids.length} entries)`);
}

/** Stream entry ids (`<ms>-<seq>`) in strictly increasing order. */
function increasing(ids) {
  const parse = (id) => id.split("-").map(BigInt);
  return ids.every((id, i) => {
    if (i === 0) return true;
    const [ms, seq] = parse(id);
    const [pms, pseq] = parse(ids[i - 1]);
    return ms > pms || (ms === pms && seq > pseq);
  });
}

function checkResult(result, job, queueWaitKnown = false) {
  assert.equal(result.job_id, job.job_id);
  assert.equal(result.tier, "fast");
  assert.equal(typeof result.summary, "string");
  assert.ok(result.summary.trim().length > 0, "the summary is empty");
  assert.ok(result.model.startsWith("claude-"), `model ${result.model}`);
  assert.ok(result.usage.output_tokens > 0 && result.usage.output_tokens <= job.max_tokens, "output tokens");
  assert.ok(result.timings.total_ms > 0, "total_ms");
  if (queueWaitKnown) {
    assert.ok(result.timings.queue_wait_ms >= 0, `queue_wait_ms ${result.timings.queue_wait_ms}`);
  } else {
    // no tierq_enqueued_at header (sendTask sets none): the queue wait is unknown, by contract
    assert.equal(result.timings.queue_wait_ms, null);
  }
  assert.deepEqual(result.metadata, job.metadata);
}

async function main() {
  assert.ok(BROKER_URL && PREFIX, "set TIERQ_NODE_BROKER_URL and TIERQ_NODE_JOB_PREFIX");
  const client = celery.createClient(BROKER_URL, BROKER_URL, QUEUE);
  const redis = new Redis(BROKER_URL, { maxRetriesPerRequest: 2 });
  try {
    await client.isReady();
    const base = { tier: "fast", text: DOC, instructions: "One sentence.", max_tokens: 64, producer_id: "node-broker" };
    const plain = { ...base, job_id: `${PREFIX}.plain`, metadata: { sender: "celery-node", n: 1 } };
    const streamed = { ...base, job_id: `${PREFIX}.streamed`, metadata: { n: 2 }, stream: true };
    const timed = { ...base, job_id: `${PREFIX}.timed`, metadata: { n: 3 } };
    // its deadline passed before it was sent: it must end expired, unrun
    const late = { ...base, job_id: `${PREFIX}.late` };
    // breaks the contract: a standard-tier job on the fast tier's queue
    const wrongTier = { ...base, job_id: `${PREFIX}.wrong-tier`, tier: "standard" };
    // breaks the message shape: a positional argument (the body must be [[], {job}, {}])
    const positional = { ...base, job_id: `${PREFIX}.positional` };

    send(client, plain);
    send(client, streamed);
    send(client, wrongTier);
    send(client, positional, ["unexpected"]);
    const now = Date.now() / 1000;
    sendWithHeaders(client, timed, { tierq_enqueued_at: now, tierq_deadline: now + 10 });
    sendWithHeaders(client, late, { tierq_enqueued_at: now - 20, tierq_deadline: now - 5 });

    const [timedOut, lateOut, plainOut, streamedOut, wrongOut, positionalOut, stream] = await Promise.all([
      outcome(client, timed.job_id),
      outcome(client, late.job_id),
      outcome(client, plain.job_id),
      outcome(client, streamed.job_id),
      outcome(client, wrongTier.job_id),
      outcome(client, positional.job_id),
      readStream(redis, streamed.job_id),
    ]);

    saw.plain = { status: plainOut.status, tier: plainOut.result?.tier, summary_chars: plainOut.result?.summary?.length };
    assert.equal(plainOut.status, "SUCCESS", `plain job: ${JSON.stringify(plainOut)}`);
    checkResult(plainOut.result, plain);
    saw.plain.queue_wait_ms = plainOut.result.timings.queue_wait_ms;
    saw.plain.raw_status = (await rawMeta(redis, plain.job_id))?.status;
    assert.equal(saw.plain.raw_status, "SUCCESS");

    saw.streamed = {
      status: streamedOut.status,
      end: stream.end,
      chunks: stream.chunks,
      restarts: stream.restarts,
      entries: stream.ids.length,
      ids_increasing: increasing(stream.ids),
    };
    assert.equal(streamedOut.status, "SUCCESS", `streamed job: ${JSON.stringify(streamedOut)}`);
    checkResult(streamedOut.result, streamed);
    assert.equal(stream.end, "succeeded");
    assert.ok(stream.chunks >= 1, "no text on the token stream");
    assert.ok(saw.streamed.ids_increasing, `stream ids not increasing: ${stream.ids}`);
    assert.equal(stream.text, streamedOut.result.summary, "the streamed text is not the summary");

    saw.timed = { status: timedOut.status, queue_wait_ms: timedOut.result?.timings?.queue_wait_ms };
    assert.equal(timedOut.status, "SUCCESS", `timed job: ${JSON.stringify(timedOut)}`);
    checkResult(timedOut.result, timed, true);

    saw.late = { status: lateOut.status, exc_type: lateOut.exc_type, raw_status: (await rawMeta(redis, late.job_id))?.status };
    assert.equal(lateOut.status, "FAILURE", `late job: ${JSON.stringify(lateOut)}`);
    assert.equal(lateOut.exc_type, "DeadlineExceededError");

    for (const [name, job, out, field] of [
      ["wrong_tier", wrongTier, wrongOut, "tier"],
      ["positional", positional, positionalOut, "body.args"],
    ]) {
      const meta = await rawMeta(redis, job.job_id);
      const message = Array.isArray(out.exc_message) ? out.exc_message.join(" ") : String(out.exc_message);
      saw[name] = { status: out.status, exc_type: out.exc_type, raw_status: meta?.status, message: message.slice(0, 200) };
      // failed, not pending: celery-node's get() would have timed out with "TIMEOUT"
      assert.equal(out.status, "FAILURE", `${name}: ${JSON.stringify(out)}`);
      assert.equal(out.exc_type, "InvalidJobError");
      assert.equal(meta?.status, "FAILURE");
      assert.ok(message.includes(field), `${name}: the error does not name ${field}: ${message}`);
    }
    saw.ok = true;
  } finally {
    redis.disconnect();
    await client.disconnect();
  }
}

await report(main, saw);
