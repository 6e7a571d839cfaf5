// Validates docs/asyncapi.yaml; run through scripts/validate-asyncapi, which installs what it needs.
//
// 1. The AsyncAPI parser (@asyncapi/parser, what `asyncapi validate` runs): the document against
//    the AsyncAPI 3.0 schema (AMQP bindings included) and the AsyncAPI ruleset. Errors and
//    warnings fail; information (such as "a newer AsyncAPI version exists") is not shown.
// 2. What no schema knows:
//    - the envelope's fields are those of `struct Envelope` in src/chat.rs and of the contract
//      (../shared/CONTRACT.md, when it is there);
//    - every example is valid against its schema, the examples agree with each other
//      (message_id = id, timestamp = ts), and the envelope schema refuses what the app refuses;
//    - names, defaults and properties in the document are those in the code.
//
// Usage: node docs/asyncapi-check/validate.mjs [docs/asyncapi.yaml]; exits 1 on any problem.

import { existsSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const require = createRequire(import.meta.url);
const { Parser } = require('@asyncapi/parser');
const Ajv = require('ajv');
const addFormats = require('ajv-formats');

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const file = path.resolve(process.argv[2] ?? path.join(root, 'docs/asyncapi.yaml'));
const problems = [];
const fail = (msg) => problems.push(msg);

// --- 1. the AsyncAPI parser ------------------------------------------------------------------
const SEVERITY = ['error', 'warning', 'info', 'hint'];
const { document, diagnostics } = await new Parser().parse(readFileSync(file, 'utf8'), { source: file });
const shown = diagnostics.filter((d) => d.severity <= 1);
for (const d of shown.slice(0, 30)) {
  const line = d.range ? `:${d.range.start.line + 1}` : '';
  console.log(`    ${SEVERITY[d.severity]} ${d.code}${line} ${d.path.join('.')}: ${d.message}`);
}
if (shown.length > 30) console.log(`    ... and ${shown.length - 30} more`);
if (!document || shown.length > 0) {
  console.log(`    FAIL ${path.relative(root, file)}: ${shown.length} problems found by the AsyncAPI parser (above)`);
  process.exit(1);
}
const doc = document.json();
console.log(`    AsyncAPI ${doc.asyncapi}: valid (${Object.keys(doc.channels).length} channels, ` +
  `${Object.keys(doc.operations).length} operations, ${Object.keys(doc.components.messages).length} messages)`);

// --- 2a. the envelope's fields ---------------------------------------------------------------
const source = (rel) => readFileSync(path.join(root, rel), 'utf8');
const sameSet = (a, b) => a.length === b.length && a.every((x) => b.includes(x));
const envelope = doc.components.schemas.Envelope;
const props = Object.keys(envelope.properties).sort();

const struct = source('src/chat.rs').match(/pub struct Envelope \{([\s\S]*?)\n\}/);
if (!struct) {
  fail('src/chat.rs: no `pub struct Envelope { ... }` found (update docs/asyncapi-check/validate.mjs)');
} else {
  const fields = [...struct[1].matchAll(/pub (\w+): ([^,]+),/g)];
  const names = fields.map((f) => f[1]).sort();
  const required = fields.filter((f) => !f[2].startsWith('Option<')).map((f) => f[1]).sort();
  if (!sameSet(props, names)) fail(`Envelope properties ${props} differ from struct Envelope's fields ${names}`);
  if (!sameSet([...envelope.required].sort(), required)) {
    fail(`Envelope required ${envelope.required} differs from struct Envelope's non-Option fields ${required}`);
  }
}
for (const name of ['Envelope', 'ServiceEnvelope']) {
  const keys = Object.keys(doc.components.schemas[name].properties).sort();
  if (!sameSet(keys, props)) fail(`${name} properties ${keys} differ from Envelope's ${props}`);
}

const contractPath = path.resolve(root, '../shared/CONTRACT.md');
if (existsSync(contractPath)) {
  const section = readFileSync(contractPath, 'utf8').split(/^## Message envelope$/m)[1]?.split(/^## /m)[0];
  const example = section?.match(/```json\n([\s\S]*?)```/);
  if (!example) {
    fail('CONTRACT.md: no "## Message envelope" section with a JSON example');
  } else {
    const keys = Object.keys(JSON.parse(example[1].replace(/"01JD3\.\.\."/, '"01JD3"')));
    for (const k of keys) if (!props.includes(k)) fail(`CONTRACT.md's envelope has "${k}", the document's has not`);
    for (const p of props) {
      if (!keys.includes(p) && !section.includes(`\`${p}\``)) fail(`"${p}" is not named in CONTRACT.md's envelope section`);
    }
    console.log(`    envelope fields match src/chat.rs and CONTRACT.md: ${props.join(', ')}`);
  }
} else {
  console.log(`    envelope fields match src/chat.rs: ${props.join(', ')} (no ${contractPath} to compare with)`);
}

// --- 2b. examples and what the schemas refuse ------------------------------------------------
const ajv = new Ajv({ strict: false, allErrors: true });
addFormats(ajv);
const validator = (schema) => ajv.compile(schema);
const errorsOf = (check) => ajv.errorsText(check.errors);
let examples = 0;
for (const [name, message] of Object.entries(doc.components.messages)) {
  const payload = message.payload && validator(message.payload);
  const headers = message.headers && validator(message.headers);
  for (const ex of message.examples ?? []) {
    examples++;
    if (payload && 'payload' in ex && !payload(ex.payload)) fail(`${name} example ${ex.name}: ${errorsOf(payload)}`);
    if (headers && 'headers' in ex && !headers(ex.headers)) fail(`${name} example ${ex.name} headers: ${errorsOf(headers)}`);
  }
  const properties = message['x-amqp-properties'];
  if (properties) {
    const check = validator(properties);
    for (const [i, ex] of (properties.examples ?? []).entries()) {
      examples++;
      if (!check(ex)) fail(`${name} x-amqp-properties example ${i}: ${errorsOf(check)}`);
      const payloadEx = message.examples?.[i]?.payload;
      if (payloadEx?.id !== undefined) {
        if (ex.message_id !== payloadEx.id) fail(`${name} example ${i}: message_id ${ex.message_id} is not the id ${payloadEx.id}`);
        if (Math.abs(ex.timestamp - Date.parse(payloadEx.ts) / 1000) > 1) fail(`${name} example ${i}: timestamp ${ex.timestamp} is not ts ${payloadEx.ts}`);
      }
    }
  }
}

// A ULID's first 10 characters are its time in milliseconds.
const ulidMillis = (id) => [...id.slice(0, 10)].reduce((t, c) => t * 32 + '0123456789ABCDEFGHJKMNPQRSTVWXYZ'.indexOf(c), 0);
for (const ex of doc.components.messages.envelope.examples) {
  if (Math.abs(ulidMillis(ex.payload.id) - Date.parse(ex.payload.ts)) > 1000) fail(`envelope example ${ex.name}: the time in id is not ts`);
}

// The wrapped form of a foreign body: text = body, id = message_id, user = app_id, ts = timestamp.
const foreign = doc.components.messages.foreignBody;
const shownAs = foreign['x-shown-as'].examples[0];
const foreignProps = foreign['x-amqp-properties'].examples[0];
const expectedShown = {
  id: foreignProps.message_id,
  text: foreign.examples[0].payload,
  user: foreignProps.app_id,
  ts: new Date(foreignProps.timestamp * 1000).toISOString(),
};
if (JSON.stringify(shownAs) !== JSON.stringify(expectedShown)) {
  fail(`foreignBody x-shown-as ${JSON.stringify(shownAs)} is not how src/chat.rs wraps it: ${JSON.stringify(expectedShown)}`);
}
const strict = validator(envelope);
if (!strict(shownAs)) fail(`foreignBody x-shown-as is not a valid envelope: ${errorsOf(strict)}`);

// What Draft::validate and Envelope::new never produce, the schema must refuse.
const good = doc.components.messages.envelope.examples[0].payload;
const refused = {
  'a type field': { ...good, type: 'error' },
  'ESC in text': { ...good, text: '\u001b[31mred' },
  'a lone CR in text': { ...good, text: 'a\rb' },
  'blank text': { ...good, text: ' \n\t' },
  'text over 4096 characters': { ...good, text: 'x'.repeat(4097) },
  'a line break in user': { ...good, user: 'ada\nbob' },
  'U+202E in user': { ...good, user: 'admin\u202enimda' },
  'user over 64 characters': { ...good, user: 'u'.repeat(65) },
  'ts without milliseconds': { ...good, ts: '2026-11-23T10:39:39Z' },
  'a lower-case id': { ...good, id: good.id.toLowerCase() },
  'a from with a space': { ...good, from: 'bad name' },
  'no ts': { id: good.id, text: good.text },
};
for (const [what, body] of Object.entries(refused)) if (strict(body)) fail(`the Envelope schema accepts ${what}`);
const accepted = { 'CRLF and tabs': { ...good, text: 'two\r\nlines\tand a tab' }, 'a right-to-left name': { ...good, user: 'علي' } };
for (const [what, body] of Object.entries(accepted)) if (!strict(body)) fail(`the Envelope schema refuses ${what}: ${errorsOf(strict)}`);
console.log(`    ${examples} examples valid and consistent; the Envelope schema refuses ${Object.keys(refused).length} invalid bodies and accepts ${Object.keys(accepted).length} valid ones`);

// --- 2c. names, defaults and properties against the code -------------------------------------
// [what, file, regex whose group 1 is the code's value, the document's value]
const ch = doc.channels;
const queueArgs = (c) => c.bindings.amqp.queue['x-arguments'];
const num = (s) => Number(s.replaceAll('_', ''));
const streamMaxBytes = queueArgs(ch.historyStream)['x-max-length-bytes'];
const codeExchange = source('src/config/rabbit.rs').match(/notifier_exchange\.take\(\)\.unwrap_or_else\(\|\| "([^"]+)"/)?.[1];
const code = [
  ['exchange name', 'src/config/rabbit.rs', /notifier_exchange\.take\(\)\.unwrap_or_else\(\|\| "([^"]+)"/, ch.exchange.address, ch.exchange.bindings.amqp.exchange.name],
  ['exchange type', 'src/bus/rabbit/declare.rs', /ExchangeKind::(\w+),\s*ExchangeDeclareOptions \{ durable: true/, (s) => s.toLowerCase(), ch.exchange.bindings.amqp.exchange.type],
  ['stream name', 'src/config/rabbit.rs', /format!\("\{exchange\}(\.\w+)"\)/, (s) => codeExchange + s, ch.historyStream.address, ch.historyStream.bindings.amqp.queue.name],
  ['stream x-max-age', 'src/config/rabbit.rs', /return Ok\("(\w+)"\.into\(\)\)/, queueArgs(ch.historyStream)['x-max-age']],
  ['stream x-max-length-bytes', 'src/config/rabbit.rs', /"NOTIFIER_HISTORY_MAX_BYTES",\s*[^,]+,\s*([\d_]+),/, num, streamMaxBytes],
  ['stream segment size', 'src/bus/rabbit/stream.rs', /\(max_bytes \/ (\d+)\)\.clamp\(([\d_]+), ([\d_]+)\)/, null, queueArgs(ch.historyStream)['x-stream-max-segment-size-bytes']],
  ['marker header', 'src/bus/rabbit/stream.rs', /const MARKER_HEADER: &str = "([^"]+)"/, Object.keys(doc.components.messages.historyMarker.headers.properties)[0]],
  ['session queue', 'src/bus/rabbit/session.rs', /format!\("(fanout-chat\.)\{\}\.\{\}", self\.0\.replica, session\)/, (s) => `${s}{replica}.{session}`, ch.sessionQueue.address],
  ['process queue', 'src/bus/rabbit/process.rs', /format!\("(fanout-chat\.\{replica\}\.process)"\)/, ch.processQueue.address],
  ['overflow queue', 'src/bus/rabbit/overflow.rs', /format!\("fanout-chat\.\{\}(\.overflow)"/, (s) => `fanout-chat.{replica}${s}`, ch.overflowQueue.address],
  ['overflow exchange', 'src/bus/rabbit/overflow.rs', /const OVERFLOW_EXCHANGE: &str = "([^"]+)"/, queueArgs(ch.sessionQueue)['x-dead-letter-exchange'], queueArgs(ch.processQueue)['x-dead-letter-exchange'], ch.overflowQueue.bindings.amqp.queue['x-bound-to']],
  ['overflow queue x-max-length', 'src/bus/rabbit/overflow.rs', /const OVERFLOW_QUEUE_MAX_LENGTH: i32 = ([\d_]+)/, num, queueArgs(ch.overflowQueue)['x-max-length']],
  ['x-overflow', 'src/bus/rabbit/overflow.rs', /"x-overflow"\.into\(\), AMQPValue::LongString\("([^"]+)"/, queueArgs(ch.sessionQueue)['x-overflow'], queueArgs(ch.processQueue)['x-overflow']],
  ['session queue x-max-length', 'src/config/rabbit.rs', /"NOTIFIER_QUEUE_MAX_LENGTH",\s*[^,]+,\s*([\d_]+),/, num, queueArgs(ch.sessionQueue)['x-max-length'], queueArgs(ch.processQueue)['x-max-length']],
  ['content_type', 'src/bus/rabbit/publish.rs', /with_content_type\("([^"]+)"/, doc.components.messages.envelope['x-amqp-properties'].properties.content_type.const, doc.components.messages.envelope.contentType],
  ['app_id', 'src/bus/rabbit/publish.rs', /with_app_id\("([^"]+)"/, doc.components.messages.envelope['x-amqp-properties'].properties.app_id.const],
  ['delivery_mode', 'src/bus/rabbit/publish.rs', /with_delivery_mode\((\d)\)/, Number, doc.components.messages.envelope['x-amqp-properties'].properties.delivery_mode.const, doc.operations.publishEnvelope.bindings.amqp.deliveryMode],
  ['message_id is the envelope id', 'src/bus/rabbit/publish.rs', /with_message_id\((envelope\.id)\b/, 'envelope.id'],
  ['text limit (bytes)', 'src/config.rs', /"NOTIFIER_MAX_MESSAGE_BYTES",\s*[^,]+,\s*(\d+),/, Number, envelope.properties.text.maxLength],
  ['user limit (bytes)', 'src/chat.rs', /pub const MAX_USER_BYTES: usize = (\d+);/, Number, envelope.properties.user.maxLength],
  ['key name limit', 'src/config/access.rs', /const MAX_NAME_LEN: usize = (\d+);/, (s) => `^[A-Za-z0-9._-]{1,${s}}$`, envelope.properties.from.pattern],
];
for (const [what, rel, regex, ...rest] of code) {
  const transform = typeof rest[0] === 'function' || rest[0] === null ? rest.shift() : (s) => s;
  const m = source(rel).match(regex);
  if (!m) {
    fail(`${what}: ${rel} no longer matches ${regex} (update docs/asyncapi-check/validate.mjs, then the document)`);
    continue;
  }
  let expected;
  if (transform === null) {
    // The segment size: a quarter of the size limit, clamped (see stream::declare).
    const [, div, lo, hi] = m;
    expected = Math.min(Math.max(Math.floor(streamMaxBytes / Number(div)), num(lo)), num(hi));
  } else {
    expected = transform(m[1]);
  }
  for (const actual of rest) {
    if (actual !== expected) fail(`${what}: the code says ${JSON.stringify(expected)}, the document ${JSON.stringify(actual)} (${rel})`);
  }
}
// The largest body delivered: 6 × the text limit + 1024 (Config::max_frame_bytes).
const frame = source('src/config.rs').match(/self\.messages\.max_bytes \* (\d+) \+ (\d+)/);
if (!frame) {
  fail('src/config.rs: max_frame_bytes no longer matches (update docs/asyncapi-check/validate.mjs)');
} else {
  const bytes = (Number(frame[1]) * envelope.properties.text.maxLength + Number(frame[2])).toLocaleString('en-US');
  for (const [where, text] of [['info.description', doc.info.description], ['foreignBody', foreign.payload.description]]) {
    if (!text.includes(bytes)) fail(`${where} does not give the largest delivered body, ${bytes} bytes`);
  }
}
console.log(`    ${code.length + 1} names, defaults and properties match the code`);

if (problems.length > 0) {
  for (const p of problems) console.log(`    FAIL ${p}`);
  process.exit(1);
}
