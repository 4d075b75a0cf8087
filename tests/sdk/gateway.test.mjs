// The official OpenAI and Anthropic clients, unchanged (only baseURL and
// apiKey set), against a real `aiorch serve` with the mock providers behind it.
//   node --test tests/sdk/*.test.mjs     (from the repository root; CTest: sdk_clients)
// AIORCH_BUILD names the build directory (default: build).
// AIORCH_SDK_GATEWAYS, a JSON object of base URLs {gw, faulty, limited, cut,
// locked}, points the same tests at gateways someone else runs (CTest's
// nginx_sdk: nginx with the aiorch module, tests/nginx_sdk.lua); each must
// be configured as startGateway below configures its own.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import OpenAI from 'openai';
import Anthropic from '@anthropic-ai/sdk';
import { AIORCH, HOST, hasServe, startMock, startServe, stopAll } from './support.mjs';

const CLIENT_KEY = 'sk-aiorch-sdk-test-client-key';
const QUESTION = 'What is the capital of France?';
const OPENAI_MODEL = 'gpt-4o-mini';
const ANTHROPIC_MODEL = 'claude-3-haiku-20240307';
const MOCK_TEXT = /^Hello from the mock (openai|anthropic) provider\. You asked: /;

let tmp;

const GIVEN = process.env.AIORCH_SDK_GATEWAYS ? JSON.parse(process.env.AIORCH_SDK_GATEWAYS) : null;
const SKIP = GIVEN !== null || hasServe() ? false : `${AIORCH} has no 'serve' command yet`;

// Starts `aiorch serve` with the mock behind it (base URLs with an optional
// /_mock/... directive prefix) and waits until /healthz answers.
async function startGateway(mockPort, { directives = '', config = null, env = {} } = {}) {
  const prefix = directives ? `/_mock/${directives}` : '';
  return startServe(config ? ['--config', config] : [], {
    OPENAI_API_KEY: 'sk-test-openai',
    ANTHROPIC_API_KEY: 'sk-ant-test-anthropic',
    OPENAI_BASE_URL: `http://${HOST}:${mockPort}${prefix}/v1`,
    ANTHROPIC_BASE_URL: `http://${HOST}:${mockPort}${prefix}`,
    ...env,
  }, (status) => status === 200 || (config && status === 401));
}

const openai = (gw, opts = {}) => new OpenAI({ baseURL: gw.url + '/v1', apiKey: 'sk-dummy', ...opts });
const anthropic = (gw, opts = {}) => new Anthropic({ baseURL: gw.url, apiKey: 'sk-ant-dummy', ...opts });
const chatBody = (extra = {}) => ({
  model: OPENAI_MODEL, max_tokens: 64, messages: [{ role: 'user', content: QUESTION }], ...extra,
});
const messagesBody = (extra = {}) => ({
  model: ANTHROPIC_MODEL, max_tokens: 64, messages: [{ role: 'user', content: QUESTION }], ...extra,
});

let mock, gw, faulty, limited, cut, locked;

before(async () => {
  if (SKIP) return;
  if (GIVEN) {
    ({ gw, faulty, limited, cut, locked } = Object.fromEntries(
      Object.entries(GIVEN).map(([name, url]) => [name, { url }])));
    return;
  }
  tmp = mkdtempSync(join(tmpdir(), 'aiorch-sdk-'));
  mock = await startMock();
  gw = await startGateway(mock.port);
  // Every upstream call of this one fails with a 500.
  faulty = await startGateway(mock.port, { directives: 'fault=500' });
  // Every upstream call is rate-limited (429, Retry-After: 1).
  limited = await startGateway(mock.port, { directives: 'fault=429,retry_after=1' });
  // Streams that break after tokens were sent.
  cut = await startGateway(mock.port, { directives: 'fault=cut,chunks=6' });
  // A gateway with client keys: the config names the variable that holds one.
  const config = join(tmp, 'gateway.lua');
  writeFileSync(config, 'return { client_keys_env = { "AIORCH_SDK_CLIENT_KEY" } }\n');
  locked = await startGateway(mock.port, { config, env: { AIORCH_SDK_CLIENT_KEY: CLIENT_KEY } });
});

after(async () => {
  await stopAll();
  if (tmp) rmSync(tmp, { recursive: true, force: true });
});

// --- OpenAI SDK --------------------------------------------------------------

test('openai: chat.completions.create', { skip: SKIP }, async () => {
  const { data, response } = await openai(gw).chat.completions.create(chatBody()).withResponse();
  assert.equal(data.object, 'chat.completion');
  assert.equal(data.choices.length, 1);
  const choice = data.choices[0];
  assert.equal(choice.message.role, 'assistant');
  assert.match(choice.message.content, MOCK_TEXT);
  assert.ok(choice.message.content.includes(QUESTION), choice.message.content);
  assert.equal(choice.finish_reason, 'stop');
  assert.ok(data.usage.prompt_tokens > 0 && data.usage.completion_tokens > 0, JSON.stringify(data.usage));
  assert.equal(data.usage.total_tokens, data.usage.prompt_tokens + data.usage.completion_tokens);
  assert.match(response.headers.get('x-aiorch-provider') || '', /^(openai|anthropic)$/);
});

test('openai: chat.completions.create stream', { skip: SKIP }, async () => {
  const client = openai(gw);
  const whole = await client.chat.completions.create(chatBody());
  const stream = await client.chat.completions.create(
    chatBody({ stream: true, stream_options: { include_usage: true } }));
  let text = '';
  let deltas = 0;
  let finish = null;
  let usage = null;
  for await (const chunk of stream) {
    assert.equal(chunk.object, 'chat.completion.chunk');
    if (chunk.usage) usage = chunk.usage;
    const c = chunk.choices[0];
    if (!c) continue;
    if (c.delta?.content) { text += c.delta.content; deltas++; }
    if (c.finish_reason) finish = c.finish_reason;
  }
  assert.ok(deltas >= 2, `expected several content deltas, got ${deltas}`);
  assert.equal(text, whole.choices[0].message.content);
  assert.equal(finish, 'stop');
  assert.ok(usage && usage.completion_tokens > 0 && usage.prompt_tokens > 0, JSON.stringify(usage));
});

test('openai: served by anthropic through X-Aiorch-Providers', { skip: SKIP }, async () => {
  const client = openai(gw, { defaultHeaders: { 'X-Aiorch-Providers': 'anthropic' } });
  const { data, response } = await client.chat.completions.create(chatBody()).withResponse();
  assert.equal(response.headers.get('x-aiorch-provider'), 'anthropic');
  assert.equal(data.object, 'chat.completion');
  assert.match(data.choices[0].message.content, /^Hello from the mock anthropic provider/);
  assert.equal(data.choices[0].finish_reason, 'stop'); // end_turn, translated
  assert.ok(data.usage.completion_tokens > 0);

  const stream = await client.chat.completions.create(
    chatBody({ stream: true, stream_options: { include_usage: true } }));
  let text = '';
  let finish = null;
  for await (const chunk of stream) {
    const c = chunk.choices[0];
    if (c?.delta?.content) text += c.delta.content;
    if (c?.finish_reason) finish = c.finish_reason;
  }
  assert.equal(text, data.choices[0].message.content);
  assert.equal(finish, 'stop');
});

test('openai: upstream 500 raises InternalServerError', { skip: SKIP }, async () => {
  const client = openai(faulty, { maxRetries: 0 });
  await assert.rejects(client.chat.completions.create(chatBody()), (err) => {
    assert.ok(err instanceof OpenAI.APIError, String(err));
    assert.ok(err instanceof OpenAI.InternalServerError, `${err.constructor.name} ${err.status}`);
    assert.ok([500, 502, 503].includes(err.status), String(err.status));
    assert.ok(err.error && typeof err.error.message === 'string', JSON.stringify(err.error));
    return true;
  });
  // The SDK's own retries (two by default) end in the same error.
  await assert.rejects(openai(faulty, { maxRetries: 1 }).chat.completions.create(chatBody()),
    OpenAI.InternalServerError);
  // A stream that fails before its first token is an HTTP error too.
  await assert.rejects(client.chat.completions.create(chatBody({ stream: true })), OpenAI.APIError);
});

test('openai: rate-limited upstreams raise RateLimitError; the SDK waits the Retry-After', { skip: SKIP },
  async () => {
    await assert.rejects(openai(limited, { maxRetries: 0 }).chat.completions.create(chatBody()), (err) => {
      assert.ok(err instanceof OpenAI.RateLimitError, `${err.constructor.name} ${err.status}`);
      assert.equal(err.status, 429);
      assert.equal(err.error?.type, 'rate_limit_exceeded', JSON.stringify(err.error));
      return true;
    });
    // One retry of the SDK's own, after the Retry-After the gateway passed on.
    const t0 = Date.now();
    await assert.rejects(openai(limited, { maxRetries: 1 }).chat.completions.create(chatBody()),
      OpenAI.RateLimitError);
    assert.ok(Date.now() - t0 >= 900, `the SDK retried after ${Date.now() - t0} ms`);
  });

test('openai: a stream cut after tokens raises, not a silent truncation', { skip: SKIP }, async () => {
  const stream = await openai(cut, { maxRetries: 0 }).chat.completions.create(chatBody({ stream: true }));
  let text = '';
  await assert.rejects((async () => {
    for await (const chunk of stream) text += chunk.choices[0]?.delta?.content || '';
  })(), OpenAI.APIError);
  assert.ok(text.length > 0, 'some tokens arrived before the error');
});

test('openai: client keys', { skip: SKIP }, async () => {
  await assert.rejects(openai(locked, { maxRetries: 0 }).chat.completions.create(chatBody()), (err) => {
    assert.ok(err instanceof OpenAI.AuthenticationError, `${err.constructor.name} ${err.status}`);
    assert.equal(err.status, 401);
    return true;
  });
  const r = await openai(locked, { apiKey: CLIENT_KEY }).chat.completions.create(chatBody());
  assert.match(r.choices[0].message.content, MOCK_TEXT);
});

test('openai: models.list', { skip: SKIP }, async () => {
  const ids = [];
  for await (const m of openai(gw).models.list()) ids.push(m.id);
  assert.ok(ids.length > 0, 'no models listed');
});

// --- Anthropic SDK -----------------------------------------------------------

test('anthropic: messages.create', { skip: SKIP }, async () => {
  const { data, response } = await anthropic(gw).messages.create(messagesBody()).withResponse();
  assert.equal(data.type, 'message');
  assert.equal(data.role, 'assistant');
  assert.equal(data.content[0].type, 'text');
  assert.match(data.content[0].text, MOCK_TEXT);
  assert.ok(data.content[0].text.includes(QUESTION), data.content[0].text);
  assert.equal(data.stop_reason, 'end_turn');
  assert.ok(data.usage.input_tokens > 0 && data.usage.output_tokens > 0, JSON.stringify(data.usage));
  assert.match(response.headers.get('x-aiorch-provider') || '', /^(openai|anthropic)$/);
});

test('anthropic: messages.create stream', { skip: SKIP }, async () => {
  const client = anthropic(gw);
  const whole = await client.messages.create(messagesBody());
  const stream = await client.messages.create(messagesBody({ stream: true }));
  const types = [];
  let text = '';
  let stop = null;
  let usage = null;
  for await (const ev of stream) {
    if (ev.type !== 'ping') types.push(ev.type);
    if (ev.type === 'content_block_delta' && ev.delta.type === 'text_delta') text += ev.delta.text;
    if (ev.type === 'message_delta') { stop = ev.delta.stop_reason; usage = ev.usage; }
  }
  const deltas = types.filter((t) => t === 'content_block_delta').length;
  assert.ok(deltas >= 2, `expected several deltas, got ${deltas}`);
  assert.deepEqual(types, ['message_start', 'content_block_start',
    ...Array(deltas).fill('content_block_delta'), 'content_block_stop', 'message_delta', 'message_stop']);
  assert.equal(text, whole.content[0].text);
  assert.equal(stop, 'end_turn');
  assert.ok(usage && usage.output_tokens > 0, JSON.stringify(usage));
});

test('anthropic: messages.stream finalMessage', { skip: SKIP }, async () => {
  const stream = anthropic(gw).messages.stream(messagesBody());
  let text = '';
  stream.on('text', (t) => { text += t; });
  const msg = await stream.finalMessage();
  assert.equal(msg.role, 'assistant');
  assert.match(msg.content[0].text, MOCK_TEXT);
  assert.equal(msg.content[0].text, text);
  assert.equal(msg.stop_reason, 'end_turn');
  assert.ok(msg.usage.output_tokens > 0);
});

test('anthropic: served by openai through X-Aiorch-Providers', { skip: SKIP }, async () => {
  const client = anthropic(gw, { defaultHeaders: { 'X-Aiorch-Providers': 'openai' } });
  const { data, response } = await client.messages.create(messagesBody()).withResponse();
  assert.equal(response.headers.get('x-aiorch-provider'), 'openai');
  assert.equal(data.type, 'message');
  assert.match(data.content[0].text, /^Hello from the mock openai provider/);
  assert.equal(data.stop_reason, 'end_turn'); // stop, translated
  assert.ok(data.usage.output_tokens > 0);

  const msg = await client.messages.stream(messagesBody()).finalMessage();
  assert.equal(msg.content[0].text, data.content[0].text);
  assert.equal(msg.stop_reason, 'end_turn');
});

test('anthropic: upstream 500 raises an APIError', { skip: SKIP }, async () => {
  const client = anthropic(faulty, { maxRetries: 0 });
  await assert.rejects(client.messages.create(messagesBody()), (err) => {
    assert.ok(err instanceof Anthropic.APIError, String(err));
    assert.ok(err.status >= 500, `${err.constructor.name} ${err.status}`);
    assert.ok(err instanceof Anthropic.InternalServerError || err.status !== 500, err.constructor.name);
    assert.equal(err.error?.type, 'error', JSON.stringify(err.error));
    return true;
  });
  await assert.rejects(client.messages.stream(messagesBody()).finalMessage(), Anthropic.APIError);
});

test('anthropic: rate-limited upstreams raise RateLimitError', { skip: SKIP }, async () => {
  await assert.rejects(anthropic(limited, { maxRetries: 0 }).messages.create(messagesBody()), (err) => {
    assert.ok(err instanceof Anthropic.RateLimitError, `${err.constructor.name} ${err.status}`);
    assert.equal(err.status, 429);
    assert.equal(err.error?.error?.type, 'rate_limit_error', JSON.stringify(err.error));
    return true;
  });
});

test('anthropic: a stream cut after tokens raises, not a silent truncation', { skip: SKIP }, async () => {
  const stream = anthropic(cut, { maxRetries: 0 }).messages.stream(messagesBody());
  let text = '';
  stream.on('text', (t) => { text += t; });
  await assert.rejects(stream.finalMessage(), Anthropic.APIError);
  assert.ok(text.length > 0, 'some tokens arrived before the error');
});

test('anthropic: client keys', { skip: SKIP }, async () => {
  await assert.rejects(anthropic(locked, { maxRetries: 0 }).messages.create(messagesBody()), (err) => {
    assert.ok(err instanceof Anthropic.AuthenticationError, `${err.constructor.name} ${err.status}`);
    assert.equal(err.status, 401);
    assert.equal(err.error?.error?.type, 'authentication_error', JSON.stringify(err.error));
    return true;
  });
  const r = await anthropic(locked, { apiKey: CLIENT_KEY }).messages.create(messagesBody());
  assert.match(r.content[0].text, MOCK_TEXT);
});

test('anthropic: models.list', { skip: SKIP }, async () => {
  const ids = [];
  for await (const m of anthropic(gw).models.list()) ids.push(m.id);
  assert.ok(ids.length > 0, 'no models listed');
});
