// tide proxy driven from Node.js (built-in fetch, no packages): the order-and-
// exactly-once test. Opens SESSIONS members of one group (half pull, half subscribe
// with Server-Sent Events), waits until they share the partitions evenly, pushes
// keyed records through the proxy while they consume, commits after each batch, and
// checks that every record arrived exactly once, in order per key, on the partition
// crc32(key) mod partitions says, and that each partition went to one member only.
//
// Environment: PROXY_URL, TOPIC, GROUP, MESSAGES, KEYS, PARTITIONS, SESSIONS, DEADLINE_MS.
// Prints one JSON summary line; exits 0 only if every check passed.

const base = process.env.PROXY_URL;
const topic = process.env.TOPIC;
const group = process.env.GROUP;
const total = Number(process.env.MESSAGES);
const keyCount = Number(process.env.KEYS);
const partitions = Number(process.env.PARTITIONS);
const sessionCount = Number(process.env.SESSIONS || 2);
const deadline = Date.now() + Number(process.env.DEADLINE_MS || 120000);
const PUSH_BATCH = 500;

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function checkDeadline(what) {
  if (Date.now() > deadline) throw new Error(`deadline passed while ${what}`);
}

async function call(method, path, body) {
  const init = { method };
  if (body !== undefined) {
    init.headers = { "content-type": "application/json" };
    init.body = JSON.stringify(body);
  }
  const response = await fetch(base + path, init);
  const text = await response.text();
  if (!response.ok) throw new Error(`${method} ${path}: ${response.status} ${text}`);
  return JSON.parse(text);
}

const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

function crc32(text) {
  let crc = 0xffffffff;
  for (const byte of new TextEncoder().encode(text)) {
    crc = CRC_TABLE[(crc ^ byte) & 0xff] ^ (crc >>> 8);
  }
  return (crc ^ 0xffffffff) >>> 0;
}

async function waitForBalance(sessions) {
  const share = partitions / sessions.length;
  for (;;) {
    const described = await Promise.all(
      sessions.map((id) => call("GET", `/v1/sessions/${id}`)),
    );
    if (described.every((d) => d.assignment.length === share)) return described;
    checkDeadline("waiting for the group to balance");
    await sleep(100); // polling interval
  }
}

async function pushAll(summary) {
  const sequence = new Map();
  for (let start = 0; start < total; start += PUSH_BATCH) {
    const records = [];
    for (let i = start; i < Math.min(total, start + PUSH_BATCH); i++) {
      const key = `k${i % keyCount}`;
      const next = sequence.get(key) ?? 0;
      sequence.set(key, next + 1);
      records.push({ key, value: `${key}:${next}` });
    }
    const answer = await call("POST", `/v1/topics/${topic}/records`, { records });
    answer.offsets.forEach((entry, index) => {
      if (entry.partition !== crc32(records[index].key) % partitions) summary.wrongPartition++;
    });
  }
}

function makeReceiver(summary) {
  const seen = new Set();
  const lastByKey = new Map();
  const ownerOf = new Map();
  return (record, via, session) => {
    const owner = ownerOf.get(record.partition);
    if (owner === undefined) ownerOf.set(record.partition, session);
    else if (owner !== session) summary.sharedPartitions++;
    const id = `${record.partition}/${record.offset}`;
    if (seen.has(id)) {
      summary.duplicates++;
      return;
    }
    seen.add(id);
    summary.received++;
    summary[via]++;
    const [key, position] = record.value.split(":");
    if (record.key !== key) summary.mismatched++;
    if (record.partition !== crc32(record.key) % partitions) summary.wrongPartition++;
    const expected = (lastByKey.get(key) ?? -1) + 1;
    if (Number(position) !== expected) summary.outOfOrder++;
    lastByKey.set(key, Number(position));
  };
}

async function pullLoop(session, receive, summary) {
  while (summary.received < total) {
    checkDeadline("pulling");
    const answer = await call("POST", `/v1/sessions/${session}/pull?max_records=300&timeout_ms=500`);
    for (const record of answer.records) receive(record, "viaPull", session);
    if (answer.records.length) await call("POST", `/v1/sessions/${session}/commit`, { batch: answer.batch });
  }
}

async function eventLoop(session, receive, summary, abort) {
  const response = await fetch(`${base}/v1/sessions/${session}/events?max_records=200&keepalive_ms=500`, {
    signal: abort.signal,
  });
  if (!response.ok) throw new Error(`events: ${response.status} ${await response.text()}`);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  try {
    while (summary.received < total) {
      checkDeadline("reading events");
      const { value, done } = await reader.read();
      if (done) throw new Error("the event stream ended early");
      buffered += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffered.indexOf("\n\n")) >= 0) {
        const block = buffered.slice(0, end);
        buffered = buffered.slice(end + 2);
        let event = "message";
        let data = null;
        for (const line of block.split("\n")) {
          if (line.startsWith("event: ")) event = line.slice(7);
          else if (line.startsWith("data: ")) data = JSON.parse(line.slice(6));
        }
        if (data === null) continue; // a keep-alive comment
        if (event === "message") receive(data, "viaEvents", session);
        else if (event === "batch") {
          summary.batches++;
          await call("POST", `/v1/sessions/${session}/commit`, { batch: data.batch });
        } else if (event === "end") throw new Error(`the event stream ended: ${JSON.stringify(data)}`);
      }
    }
  } finally {
    abort.abort(); // the disconnect closes the session
    await reader.cancel().catch(() => {});
  }
}

async function main() {
  const summary = {
    received: 0, duplicates: 0, outOfOrder: 0, wrongPartition: 0, mismatched: 0,
    sharedPartitions: 0, viaPull: 0, viaEvents: 0, batches: 0, leftOver: 0,
    seconds: 0,
  };
  const sessions = [];
  for (let i = 0; i < sessionCount; i++) {
    sessions.push((await call("POST", "/v1/sessions", { group, topics: [topic] })).session_id);
  }
  await waitForBalance(sessions);
  const started = Date.now();
  const receive = makeReceiver(summary);
  const pulling = sessions.filter((_, i) => i % 2 === 0);
  const streaming = sessions.filter((_, i) => i % 2 === 1);
  const consuming = Promise.all([
    ...pulling.map((session) => pullLoop(session, receive, summary)),
    ...streaming.map((session) =>
      eventLoop(session, receive, summary, new AbortController()).catch((error) => {
        if (summary.received < total) throw error;
      }),
    ),
  ]);
  await pushAll(summary);
  await consuming;
  summary.seconds = (Date.now() - started) / 1000;
  // Nothing more may come: a last pull of each pulling session finds nothing.
  for (const session of pulling) {
    const extra = await call("POST", `/v1/sessions/${session}/pull?timeout_ms=1000`);
    summary.leftOver += extra.records.length;
    await call("DELETE", `/v1/sessions/${session}`);
  }
  console.log(JSON.stringify(summary));
  const ok = summary.received === total && summary.duplicates === 0 && summary.outOfOrder === 0
    && summary.wrongPartition === 0 && summary.mismatched === 0 && summary.leftOver === 0
    && summary.sharedPartitions === 0 && summary.viaPull > 0 && summary.viaEvents > 0;
  process.exit(ok ? 0 : 1);
}

main().catch((error) => {
  console.error(error);
  process.exit(2);
});
