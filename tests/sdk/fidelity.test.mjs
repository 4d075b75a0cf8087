// Fidelity through the gateway, with the official clients: every field the
// OpenAI and Anthropic APIs carry goes through (passed as it came, or
// translated), or is refused by name, never silently dropped. Each case
// runs both clients on both paths: same-API (OpenAI client -> openai
// provider, Anthropic client -> anthropic provider) and cross-API (each
// client -> the other provider). A real `aiorch serve --workers 0` stands in
// front of tests/sdk/recording_upstream.lua (the mock providers, which
// record each request they receive), so every case asserts what the
// client got and exactly what went upstream.
//   node --test tests/sdk/fidelity.test.mjs   (from the repository root; CTest: sdk_clients)
// AIORCH_BUILD names the build directory (default: build).
import { test, before, after, beforeEach } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync, mkdtempSync, mkdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomUUID } from 'node:crypto';
import OpenAI from 'openai';
import Anthropic from '@anthropic-ai/sdk';
import { jsonSchemaOutputFormat } from '@anthropic-ai/sdk/helpers/json-schema';
import { betaTool } from '@anthropic-ai/sdk/helpers/beta/json-schema';
import { standardResponseFormat } from 'openai/helpers/standard-schema';
import { AIORCH, HOST, firstLine, hasServe, start, startServe, stop, stopAll } from './support.mjs';

const OPENAI_KEY = 'sk-fid-upstream-openai-7310';
const ANTHROPIC_KEY = 'sk-ant-fid-upstream-7311';
const CLIENT_KEY = 'sk-fid-client-dummy-7312';
const OPENAI_MODEL = 'gpt-4o';
const ANTHROPIC_MODEL = 'claude-opus-4-8';
// The providers' own models: what a provider sends for another API's model.
const OPENAI_DEFAULT = 'gpt-4o-mini';
const ANTHROPIC_DEFAULT = 'claude-3-haiku-20240307';
const PNG = 'iVBORw0KGgo='; // the PNG signature
const IMAGE_URL = 'https://example.com/cat.jpg';

const SKIP = hasServe() ? false : `${AIORCH} has no 'serve' command yet`;

// --- Processes -------------------------------------------------------------------

let tmp;

// The recording upstream: its mock port and its control port.
async function startUpstream() {
  const child = start(['run', 'tests/sdk/recording_upstream.lua']);
  const [port, control] = await firstLine(child, /^PORT (\d+) (\d+)$/, 'the upstream');
  return { child, port, url: `http://${HOST}:${port}`, control: `http://${HOST}:${control}` };
}

// `aiorch serve --workers 0` with a configuration file; waits for /healthz.
let configs = 0;
async function startGateway(config, extraArgs = []) {
  const file = join(tmp, `gateway-${++configs}.lua`);
  writeFileSync(file, config);
  return startServe(['--workers', '0', '--config', file, ...extraArgs], {
    FID_OPENAI_KEY: OPENAI_KEY, FID_ANTHROPIC_KEY: ANTHROPIC_KEY,
  });
}

// A configuration: both providers on the recording upstream (each base URL
// may carry mock directives), plus extra Lua fields.
function gatewayConfig(up, { openaiDirectives = '', anthropicDirectives = '', extra = '' } = {}) {
  const base = (d) => `${up.url}${d ? `/_mock/${d}` : ''}`;
  return `return {
  providers = {
    openai = { api_key_env = "FID_OPENAI_KEY", base_url = "${base(openaiDirectives)}/v1", priority = 1 },
    anthropic = { api_key_env = "FID_ANTHROPIC_KEY", base_url = "${base(anthropicDirectives)}", priority = 2 },
  },
  ${extra}
}
`;
}

let up; // the recording upstream
let gw; // the gateway in front of it

before(async () => {
  if (SKIP) return;
  tmp = mkdtempSync(join(tmpdir(), 'aiorch-fidelity-'));
  up = await startUpstream();
  gw = await startGateway(gatewayConfig(up, { extra: `aliases = {
    ["fid-smart"] = { strategy = "fallback", providers = { "anthropic:claude-sonnet-4-6", "openai:gpt-4.1" } },
    ["fid-openai-first"] = { strategy = "fallback", providers = { "openai:o3-mini", "anthropic:claude-haiku-4-5" } },
  },` }));
});

after(async () => {
  await stopAll();
  if (tmp) rmSync(tmp, { recursive: true, force: true });
});

// --- What went upstream ------------------------------------------------------------

// The requests the upstream received since the last take, oldest first,
// each with its body decoded (json).
async function take() {
  const r = await fetch(up.control + '/take', { method: 'POST' });
  const list = await r.json();
  return list.map((x) => ({ ...x, json: x.body ? JSON.parse(x.body) : null }));
}

// The one request that went upstream (there must be exactly one).
async function one() {
  const list = await take();
  assert.equal(list.length, 1, `expected one upstream request, got ${list.length}: `
    + JSON.stringify(list.map((x) => x.path)));
  return list[0];
}

// Which provider a recorded request went to.
const providerOf = (rec) => (rec.path === '/v1/chat/completions' ? 'openai'
  : rec.path.startsWith('/v1/messages') ? 'anthropic' : rec.path);

// Every request that went upstream carries the gateway's provider key, never the client's.
function assertUpstreamKeys(list) {
  for (const rec of list) {
    if (providerOf(rec) === 'openai') {
      assert.equal(rec.headers.authorization, `Bearer ${OPENAI_KEY}`);
      assert.equal(rec.headers['x-api-key'], undefined);
    } else {
      assert.equal(rec.headers['x-api-key'], ANTHROPIC_KEY);
      assert.equal(rec.headers.authorization, undefined);
    }
  }
}

beforeEach(async () => {
  if (!SKIP) await take();
});

// --- Clients -----------------------------------------------------------------------

// Clients of the gateway; provider: X-Aiorch-Providers (null: routed by model).
const oa = (provider = null, headers = {}, opts = {}) => new OpenAI({
  baseURL: gw.url + '/v1', apiKey: CLIENT_KEY, maxRetries: 0,
  defaultHeaders: { ...(provider ? { 'X-Aiorch-Providers': provider } : {}), ...headers }, ...opts,
});
const an = (provider = null, headers = {}, opts = {}) => new Anthropic({
  baseURL: gw.url, apiKey: CLIENT_KEY, maxRetries: 0,
  defaultHeaders: { ...(provider ? { 'X-Aiorch-Providers': provider } : {}), ...headers }, ...opts,
});
// The same clients, straight to the upstream (what the SDK sends without a gateway).
const oaDirect = () => new OpenAI({ baseURL: up.url + '/v1', apiKey: OPENAI_KEY, maxRetries: 0 });
const anDirect = (opts = {}) => new Anthropic({ baseURL: up.url, apiKey: ANTHROPIC_KEY, maxRetries: 0, ...opts });

const chat = (messages, extra = {}) => ({ model: OPENAI_MODEL, messages, ...extra });
const msgs = (messages, extra = {}) => ({ model: ANTHROPIC_MODEL, max_tokens: 4096, messages, ...extra });
const user = (content) => ({ role: 'user', content });
const assistant = (content) => ({ role: 'assistant', content });

// The four paths: a client API and the provider that answers it.
const PATHS = [
  ['openai', 'openai'], ['openai', 'anthropic'], ['anthropic', 'anthropic'], ['anthropic', 'openai'],
];
const label = (client, provider) => `${client} client -> ${provider} provider`;

// The text of an answer, whichever API it is in.
const textOf = (api, r) => (api === 'openai' ? r.choices[0].message.content
  : r.content.filter((b) => b.type === 'text').map((b) => b.text).join(''));

// A request refused by the gateway: the client's BadRequestError, in its
// own error shape, with this message; nothing went upstream.
async function assertRefused(api, promise, message) {
  await assert.rejects(promise, (err) => {
    if (api === 'openai') {
      assert.ok(err instanceof OpenAI.BadRequestError, `${err.constructor.name} ${err.status} ${err.message}`);
      assert.equal(err.error?.type, 'invalid_request_error', JSON.stringify(err.error));
      assert.equal(err.error.message, message);
    } else {
      assert.ok(err instanceof Anthropic.BadRequestError, `${err.constructor.name} ${err.status} ${err.message}`);
      assert.equal(err.error?.type, 'error', JSON.stringify(err.error));
      assert.equal(err.error.error.type, 'invalid_request_error');
      assert.equal(err.error.error.message, message);
    }
    return true;
  });
  assert.deepEqual((await take()).map((x) => x.path), [], 'nothing went upstream');
}

// A JSON Schema the mock fills in, and a check of an instance of it.
const WEATHER = {
  type: 'object',
  properties: {
    city: { type: 'string' },
    unit: { type: 'string', enum: ['celsius', 'fahrenheit'] },
    days: { type: 'integer', minimum: 1, maximum: 7 },
  },
  required: ['city', 'unit', 'days'],
  additionalProperties: false,
};
const TIME = {
  type: 'object',
  properties: { zone: { type: 'string' } },
  required: ['zone'],
  additionalProperties: false,
};
function assertWeather(args) {
  assert.deepEqual(Object.keys(args).sort(), ['city', 'days', 'unit'], JSON.stringify(args));
  assert.equal(typeof args.city, 'string');
  assert.ok(['celsius', 'fahrenheit'].includes(args.unit));
  assert.ok(Number.isInteger(args.days) && args.days >= 1 && args.days <= 7);
}
const OPENAI_TOOLS = [
  { type: 'function', function: { name: 'get_weather', description: 'Weather now', parameters: WEATHER } },
  { type: 'function', function: { name: 'get_time', description: 'Time now', parameters: TIME } },
];
const ANTHROPIC_TOOLS = [
  { name: 'get_weather', description: 'Weather now', input_schema: WEATHER },
  { name: 'get_time', description: 'Time now', input_schema: TIME },
];
const toolsFor = (api) => (api === 'openai' ? OPENAI_TOOLS : ANTHROPIC_TOOLS);

// The tool calls of an answer as [{id, name, args}], whichever API.
function callsOf(api, r) {
  if (api === 'openai') {
    return (r.choices[0].message.tool_calls || []).map((c) => ({
      id: c.id, name: c.function.name, args: JSON.parse(c.function.arguments),
    }));
  }
  return r.content.filter((b) => b.type === 'tool_use').map((b) => ({ id: b.id, name: b.name, args: b.input }));
}

// What an upstream request says, whichever API it is in: the turns as
// [role, [kinds of content]], the system text, the tool choice in canonical words.
function turnsOf(rec) {
  const body = rec.json;
  const kinds = (c) => (typeof c === 'string' ? ['text'] : c.map((p) => p.type));
  if (providerOf(rec) === 'openai') {
    return body.messages.map((m) => [m.role, m.role === 'assistant' && m.tool_calls
      ? [...(m.content ? kinds(m.content) : []), ...m.tool_calls.map(() => 'tool_call')]
      : m.role === 'tool' ? ['tool_result'] : kinds(m.content)]);
  }
  return body.messages.map((m) => [m.role, kinds(m.content)]);
}

// --- Model routing -----------------------------------------------------------------

test('routing: every default prefix reaches its provider with the model named', { skip: SKIP }, async () => {
  const cases = [
    ['gpt-4o', 'openai'], ['gpt-4.1-nano', 'openai'], ['o1-mini', 'openai'], ['o3-mini', 'openai'],
    ['o4-mini', 'openai'], ['chatgpt-4o-latest', 'openai'],
    ['claude-opus-4-8', 'anthropic'], ['claude-3-haiku-20240307', 'anthropic'], ['claude-sonnet-4-6', 'anthropic'],
  ];
  for (const [model, provider] of cases) {
    for (const api of ['openai', 'anthropic']) {
      const what = `${model} from the ${api} client`;
      const { data, response } = api === 'openai'
        ? await oa().chat.completions.create(chat([user('hi')], { model })).withResponse()
        : await an().messages.create(msgs([user('hi')], { model })).withResponse();
      const rec = await one();
      assert.equal(providerOf(rec), provider, what);
      assert.equal(rec.json.model, model, what);
      assert.equal(response.headers.get('x-aiorch-provider'), provider, what);
      assert.equal(response.headers.get('x-aiorch-model'), model, what);
      assert.equal(data.model, model, what);
      assertUpstreamKeys([rec]);
    }
  }
});

test('routing: an alias maps to a model per provider; the model reported is the one that answered', { skip: SKIP },
  async () => {
    for (const api of ['openai', 'anthropic']) {
      // fid-smart: anthropic's claude-sonnet-4-6 first, then openai's gpt-4.1
      const { data, response } = api === 'openai'
        ? await oa().chat.completions.create(chat([user('hi')], { model: 'fid-smart' })).withResponse()
        : await an().messages.create(msgs([user('hi')], { model: 'fid-smart' })).withResponse();
      const rec = await one();
      assert.equal(providerOf(rec), 'anthropic');
      assert.equal(rec.json.model, 'claude-sonnet-4-6');
      assert.equal(response.headers.get('x-aiorch-provider'), 'anthropic');
      assert.equal(response.headers.get('x-aiorch-model'), 'claude-sonnet-4-6');
      assert.equal(data.model, 'claude-sonnet-4-6');
      // the alias with the openai provider named: its model for openai
      const second = api === 'openai'
        ? await oa('openai').chat.completions.create(chat([user('hi')], { model: 'fid-smart' })).withResponse()
        : await an('openai').messages.create(msgs([user('hi')], { model: 'fid-smart' })).withResponse();
      const rec2 = await one();
      assert.equal(providerOf(rec2), 'openai');
      assert.equal(rec2.json.model, 'gpt-4.1');
      assert.equal(second.response.headers.get('x-aiorch-model'), 'gpt-4.1');
      assert.equal(second.data.model, 'gpt-4.1');
    }
  });

test('routing: a stream names the model that answered in its first event and its headers', { skip: SKIP },
  async () => {
    for (const [client, provider] of PATHS) {
      const what = label(client, provider);
      const expected = provider === 'openai' ? (client === 'openai' ? OPENAI_MODEL : OPENAI_DEFAULT)
        : (client === 'anthropic' ? ANTHROPIC_MODEL : ANTHROPIC_DEFAULT);
      let first;
      let headers;
      if (client === 'openai') {
        const { data: stream, response } = await oa(provider).chat.completions.create(
          chat([user('hi')], { stream: true })).withResponse();
        headers = response.headers;
        for await (const chunk of stream) first = first || chunk;
        assert.equal(first.model, expected, what);
      } else {
        const { data: stream, response } = await an(provider).messages.create(
          msgs([user('hi')], { stream: true })).withResponse();
        headers = response.headers;
        for await (const ev of stream) first = first || ev;
        assert.equal(first.type, 'message_start', what);
        assert.equal(first.message.model, expected, what);
      }
      assert.equal(headers.get('x-aiorch-provider'), provider, what);
      assert.equal(headers.get('x-aiorch-model'), expected, what);
      assert.equal(headers.get('x-aiorch-attempts'), null, `${what}: a stream's headers leave before the end`);
      const rec = await one();
      assert.equal(providerOf(rec), provider, what);
      assert.equal(rec.json.model, expected, what);
    }
  });

test('routing: an unknown model is a 404 model_not_found in the client\'s shape', { skip: SKIP }, async () => {
  await assert.rejects(oa().chat.completions.create(chat([user('hi')], { model: 'fid-no-such-model' })), (err) => {
    assert.ok(err instanceof OpenAI.NotFoundError, `${err.constructor.name} ${err.status}`);
    assert.equal(err.code, 'model_not_found');
    assert.match(err.error.message, /The model 'fid-no-such-model' is not served here/);
    return true;
  });
  await assert.rejects(an().messages.create(msgs([user('hi')], { model: 'fid-no-such-model' })), (err) => {
    assert.ok(err instanceof Anthropic.NotFoundError, `${err.constructor.name} ${err.status}`);
    assert.equal(err.error.error.type, 'not_found_error');
    assert.match(err.error.error.message, /The model 'fid-no-such-model' is not served here/);
    return true;
  });
  assert.deepEqual(await take(), []);
});

// --- Conversations -----------------------------------------------------------------

test('multi-turn: every turn goes upstream as a turn of its own, never flattened', { skip: SKIP }, async () => {
  const nonce = randomUUID();
  for (const [client, provider] of PATHS) {
    const what = label(client, provider);
    let r;
    if (client === 'openai') {
      r = await oa(provider).chat.completions.create(chat([
        { role: 'system', content: `Be terse. ${nonce}` },
        user('My name is Ada.'), assistant('Hello Ada.'), user('What is my name?'),
      ], { max_completion_tokens: 77 }));
    } else {
      r = await an(provider).messages.create(msgs([
        user('My name is Ada.'), assistant('Hello Ada.'), user('What is my name?'),
      ], { system: `Be terse. ${nonce}` }));
    }
    assert.match(textOf(client, r), /You asked: What is my name\?/, what);
    const rec = await one();
    assert.equal(providerOf(rec), provider, what);
    const body = rec.json;
    // the most tokens the answer may have, in each API's own field
    if (provider === 'anthropic') assert.equal(body.max_tokens, client === 'anthropic' ? 4096 : 77, what);
    else assert.equal(client === 'openai' ? body.max_completion_tokens : body.max_tokens, client === 'openai' ? 77
      : 4096, what);
    if (provider === 'openai') {
      assert.deepEqual(body.messages, [
        { role: 'system', content: `Be terse. ${nonce}` },
        { role: 'user', content: 'My name is Ada.' },
        { role: 'assistant', content: 'Hello Ada.' },
        { role: 'user', content: 'What is my name?' },
      ], what);
    } else {
      assert.equal(body.system, `Be terse. ${nonce}`, what);
      assert.deepEqual(body.messages, [
        { role: 'user', content: 'My name is Ada.' },
        { role: 'assistant', content: 'Hello Ada.' },
        { role: 'user', content: 'What is my name?' },
      ], what);
    }
  }
});

// --- Tools -------------------------------------------------------------------------

// tool_choice in each API's words: [canonical, openai, anthropic, the calls the mock makes].
const TOOL_CHOICES = [
  ['auto', 'auto', { type: 'auto' }, ['get_weather']],
  ['none', 'none', { type: 'none' }, []],
  ['required', 'required', { type: 'any' }, ['get_weather']],
  ['named', { type: 'function', function: { name: 'get_time' } }, { type: 'tool', name: 'get_time' }, ['get_time']],
];

test('tools: every tool_choice form, translated or passed', { skip: SKIP }, async () => {
  for (const [client, provider] of PATHS) {
    for (const [form, oaChoice, anChoice, names] of TOOL_CHOICES) {
      const what = `${label(client, provider)}, tool_choice ${form}`;
      const question = 'What is the weather in Paris? Use get_weather.';
      const r = client === 'openai'
        ? await oa(provider).chat.completions.create(chat([user(question)],
          { tools: OPENAI_TOOLS, tool_choice: oaChoice }))
        : await an(provider).messages.create(msgs([user(question)], { tools: ANTHROPIC_TOOLS, tool_choice: anChoice }));
      const calls = callsOf(client, r);
      assert.deepEqual(calls.map((c) => c.name), names, what);
      if (names.length) {
        if (client === 'openai') assert.equal(r.choices[0].finish_reason, 'tool_calls', what);
        else assert.equal(r.stop_reason, 'tool_use', what);
        if (names[0] === 'get_weather') assertWeather(calls[0].args);
      } else {
        assert.match(textOf(client, r), /^Hello from the mock/, what);
      }
      const rec = await one();
      assert.equal(providerOf(rec), provider, what);
      if (provider === 'openai') {
        assert.deepEqual(rec.json.tool_choice, oaChoice, what);
        assert.deepEqual(rec.json.tools.map((t) => [t.type, t.function.name, t.function.parameters]),
          [['function', 'get_weather', WEATHER], ['function', 'get_time', TIME]], what);
      } else {
        assert.deepEqual(rec.json.tool_choice, anChoice, what);
        assert.deepEqual(rec.json.tools.map((t) => [t.name, t.input_schema]),
          [['get_weather', WEATHER], ['get_time', TIME]], what);
      }
    }
  }
});

test('tools: parallel calls, streamed and assembled by the SDK stream helpers, with their indices', { skip: SKIP },
  async () => {
    const question = 'get_time and get_weather, please';
    for (const [client, provider] of PATHS) {
      const what = label(client, provider);
      let plain;
      let streamed;
      if (client === 'openai') {
        const body = chat([user(question)], { tools: OPENAI_TOOLS });
        plain = await oa(provider).chat.completions.create(body);
        streamed = await oa(provider).chat.completions.stream(body).finalChatCompletion();
        // the raw chunks: each call opens with its index, id and name
        const opened = [];
        for await (const chunk of await oa(provider).chat.completions.create({ ...body, stream: true })) {
          for (const tc of chunk.choices[0]?.delta?.tool_calls || []) {
            if (tc.id) opened.push([tc.index, tc.function.name]);
          }
        }
        assert.deepEqual(opened, [[0, 'get_weather'], [1, 'get_time']], what);
        assert.equal(streamed.choices[0].finish_reason, 'tool_calls', what);
      } else {
        const body = msgs([user(question)], { tools: ANTHROPIC_TOOLS });
        plain = await an(provider).messages.create(body);
        streamed = await an(provider).messages.stream(body).finalMessage();
        const opened = [];
        for await (const ev of await an(provider).messages.create({ ...body, stream: true })) {
          if (ev.type === 'content_block_start' && ev.content_block.type === 'tool_use') {
            opened.push([ev.index, ev.content_block.name]);
          }
        }
        assert.deepEqual(opened.map((o) => o[1]), ['get_weather', 'get_time'], what);
        assert.equal(opened[1][0], opened[0][0] + 1, what);
        assert.equal(streamed.stop_reason, 'tool_use', what);
      }
      for (const r of [plain, streamed]) {
        const calls = callsOf(client, r);
        assert.deepEqual(calls.map((c) => c.name), ['get_weather', 'get_time'], what);
        assertWeather(calls[0].args);
        assert.equal(typeof calls[1].args.zone, 'string', what);
        assert.equal(new Set(calls.map((c) => c.id)).size, 2, what);
        assert.match(calls[0].id, provider === 'openai' ? /^call_mock/ : /^toolu_/, `${what}: the upstream's ids`);
      }
      const recs = await take();
      assert.equal(recs.length, 3, what);
      assert.ok(recs.every((x) => providerOf(x) === provider), what);
      assert.deepEqual(recs.map((x) => x.json.stream === true), [false, true, true], what);
      // one call at most: parallel_tool_calls false is disable_parallel_tool_use
      const single = client === 'openai'
        ? await oa(provider).chat.completions.create(chat([user(question)],
          { tools: OPENAI_TOOLS, parallel_tool_calls: false }))
        : await an(provider).messages.create(msgs([user(question)],
          { tools: ANTHROPIC_TOOLS, tool_choice: { type: 'auto', disable_parallel_tool_use: true } }));
      assert.deepEqual(callsOf(client, single).map((c) => c.name), ['get_weather'], what);
      const rec = await one();
      if (provider === 'openai') assert.equal(rec.json.parallel_tool_calls, false, what);
      else assert.deepEqual(rec.json.tool_choice, { type: 'auto', disable_parallel_tool_use: true }, what);
    }
  });

test('tools: a two-turn round trip with the SDKs\' tool runners; ids unchanged across turns', { skip: SKIP },
  async () => {
    for (const [client, provider] of PATHS) {
      for (const stream of [false, true]) {
        const what = `${label(client, provider)}${stream ? ', streamed' : ''}`;
        const seen = [];
        let final;
        let firstIds;
        if (client === 'openai') {
          const runner = oa(provider).chat.completions.runTools({
            ...chat([user('Weather and time in Paris: get_weather and get_time')]),
            stream,
            tools: [
              { type: 'function', function: { name: 'get_weather', parameters: WEATHER, parse: JSON.parse,
                function: (args) => { seen.push(args); return '22 C, sunny'; } } },
              { type: 'function', function: { name: 'get_time', parameters: TIME, parse: JSON.parse,
                function: () => '12:00' } },
            ],
          });
          final = await runner.finalContent();
          firstIds = runner.messages.filter((m) => m.role === 'tool').map((m) => m.tool_call_id);
          assert.ok(final.endsWith(`Tool results: [${firstIds[0]}] 22 C, sunny; [${firstIds[1]}] 12:00`), final);
        } else {
          const weather = betaTool({ name: 'get_weather', description: 'Weather now', inputSchema: WEATHER,
            run: (args) => { seen.push(args); return '22 C, sunny'; } });
          const time = betaTool({ name: 'get_time', description: 'Time now', inputSchema: TIME,
            run: () => '12:00' });
          const runner = an(provider).beta.messages.toolRunner(
            msgs([user('Weather and time in Paris: get_weather and get_time')], { tools: [weather, time], stream }));
          const message = await runner;
          final = message.content.filter((b) => b.type === 'text').map((b) => b.text).join('');
          assert.equal(message.stop_reason, 'end_turn', what);
          firstIds = [...final.matchAll(/\[(\w+)\]/g)].map((m) => m[1]);
        }
        assert.equal(seen.length, 1, what);
        assertWeather(seen[0]);
        assert.equal(firstIds.length, 2, what);
        // Upstream: the first turn's calls, then the second turn that answers them by the same ids.
        let recs = await take();
        if (client === 'anthropic' && provider === 'anthropic') {
          // The runner's message thread first: the upstream refuses it (it keeps no threads) with the
          // details the SDK reads, which reach it unchanged; the SDK then sends the whole conversation.
          const threaded = recs.shift();
          assert.deepEqual(threaded.json.thread, { type: 'create' }, what);
          assert.match(threaded.headers['anthropic-beta'], /message-threads-/, what);
          assert.match(threaded.rejected, /message threads are not supported/, what);
        }
        // (an openai provider keeps no threads either: the gateway refuses the thread as the API does,
        // so nothing of it went upstream)
        assert.equal(recs.length, 2, what);
        assert.ok(recs.every((x) => x.json.thread === undefined), what);
        assert.ok(recs.every((x) => providerOf(x) === provider), what);
        const second = recs[1].json;
        if (provider === 'openai') {
          const asked = second.messages.find((m) => m.role === 'assistant');
          assert.deepEqual(asked.tool_calls.map((c) => c.id), firstIds, what);
          assert.deepEqual(second.messages.filter((m) => m.role === 'tool').map((m) => m.tool_call_id), firstIds, what);
          assert.match(firstIds[0], /^call_mock/, what);
        } else {
          const asked = second.messages.find((m) => m.role === 'assistant');
          assert.deepEqual(asked.content.filter((b) => b.type === 'tool_use').map((b) => b.id), firstIds, what);
          const results = second.messages[2].content.filter((b) => b.type === 'tool_result');
          assert.deepEqual(results.map((b) => b.tool_use_id), firstIds, what);
          assert.match(firstIds[0], /^toolu_/, what);
        }
        assert.deepEqual(turnsOf(recs[1]).map((t) => t[0]), provider === 'openai'
          ? ['user', 'assistant', 'tool', 'tool'] : ['user', 'assistant', 'user'], what);
      }
    }
  });

// --- Images, structured output, stop sequences -------------------------------------

test('images: a data URL is base64 data and an http URL a url source, both ways', { skip: SKIP }, async () => {
  for (const [client, provider] of PATHS) {
    const what = label(client, provider);
    const r = client === 'openai'
      ? await oa(provider).chat.completions.create(chat([user([
        { type: 'text', text: 'What is in these?' },
        { type: 'image_url', image_url: { url: `data:image/png;base64,${PNG}` } },
        { type: 'image_url', image_url: { url: IMAGE_URL } },
      ])]))
      : await an(provider).messages.create(msgs([user([
        { type: 'text', text: 'What is in these?' },
        { type: 'image', source: { type: 'base64', media_type: 'image/png', data: PNG } },
        { type: 'image', source: { type: 'url', url: IMAGE_URL } },
      ])]));
    assert.ok(textOf(client, r).endsWith('I see 2 images.'), `${what}: ${textOf(client, r)}`);
    const rec = await one();
    assert.equal(providerOf(rec), provider, what);
    const parts = rec.json.messages[0].content;
    if (provider === 'openai') {
      assert.deepEqual(parts, [
        { type: 'text', text: 'What is in these?' },
        { type: 'image_url', image_url: { url: `data:image/png;base64,${PNG}` } },
        { type: 'image_url', image_url: { url: IMAGE_URL } },
      ], what);
    } else {
      assert.equal(rec.json.system, undefined, `${what}: no system prompt of the gateway's`);
      assert.deepEqual(parts, [
        { type: 'text', text: 'What is in these?' },
        { type: 'image', source: { type: 'base64', media_type: 'image/png', data: PNG } },
        { type: 'image', source: { type: 'url', url: IMAGE_URL } },
      ], what);
    }
  }
});

const PERSON = {
  type: 'object',
  properties: {
    name: { type: 'string' },
    age: { type: 'integer', minimum: 0, maximum: 150 },
    pets: { type: 'array', items: { type: 'string' } },
  },
  required: ['name', 'age', 'pets'],
  additionalProperties: false,
};
function assertPerson(v) {
  assert.deepEqual(Object.keys(v).sort(), ['age', 'name', 'pets'], JSON.stringify(v));
  assert.equal(typeof v.name, 'string');
  assert.ok(Number.isInteger(v.age) && v.age >= 0 && v.age <= 150);
  assert.ok(Array.isArray(v.pets) && v.pets.every((p) => typeof p === 'string'));
}

// PERSON as a Standard Schema (what zod, valibot... implement), for the OpenAI SDK's helpers.
const PERSON_STANDARD = {
  '~standard': {
    version: 1,
    vendor: 'aiorch-test',
    validate(value) {
      try {
        assertPerson(value);
        return { value };
      } catch (e) {
        return { issues: [{ message: e.message }] };
      }
    },
    jsonSchema: { input: () => structuredClone(PERSON) },
  },
};

test('json_schema: the SDKs\' parse helpers get an instance of the schema, plain and streamed', { skip: SKIP },
  async () => {
    const format = standardResponseFormat(PERSON_STANDARD, 'person');
    for (const [client, provider] of PATHS) {
      const what = label(client, provider);
      let plain;
      let streamed;
      // the schema as the SDK sends it (Anthropic's helper moves what the API does not enforce to descriptions)
      const sent = client === 'openai' ? format.json_schema.schema : jsonSchemaOutputFormat(PERSON).schema;
      if (client === 'openai') {
        const body = chat([user('Who is it?')], { response_format: format });
        plain = (await oa(provider).chat.completions.parse(body)).choices[0].message.parsed;
        streamed = (await oa(provider).chat.completions.stream(body).finalChatCompletion()).choices[0].message.parsed;
      } else {
        const body = msgs([user('Who is it?')], { output_config: { format: jsonSchemaOutputFormat(PERSON) } });
        plain = (await an(provider).messages.parse(body)).parsed_output;
        streamed = (await an(provider).messages.stream(body).finalMessage()).parsed_output;
      }
      assertPerson(plain);
      assert.deepEqual(streamed, plain, what);
      const recs = await take();
      assert.equal(recs.length, 2, what);
      for (const rec of recs) {
        assert.equal(providerOf(rec), provider, what);
        if (provider === 'openai') {
          assert.equal(rec.json.response_format.type, 'json_schema', what);
          assert.deepEqual(rec.json.response_format.json_schema.schema, sent, what);
          if (client === 'openai') assert.equal(rec.json.response_format.json_schema.name, 'person', what);
        } else {
          assert.deepEqual(rec.json.output_config.format, { type: 'json_schema', schema: sent }, what);
        }
      }
    }
  });

test('stop sequences: stop and stop_sequences cut the answer, translated both ways', { skip: SKIP }, async () => {
  for (const [client, provider] of PATHS) {
    const what = label(client, provider);
    for (const stream of [false, true]) {
      let r;
      if (client === 'openai') {
        const body = chat([user('Say it')], { stop: ['You asked'] });
        r = stream ? await oa(provider).chat.completions.stream(body).finalChatCompletion()
          : await oa(provider).chat.completions.create(body);
        assert.equal(r.choices[0].finish_reason, 'stop', what);
      } else {
        const body = msgs([user('Say it')], { stop_sequences: ['You asked'] });
        r = stream ? await an(provider).messages.stream(body).finalMessage() : await an(provider).messages.create(body);
        // (an OpenAI upstream does not say which sequence stopped it)
        assert.equal(r.stop_reason, provider === 'anthropic' ? 'stop_sequence' : 'end_turn', what);
        assert.equal(r.stop_sequence, provider === 'anthropic' ? 'You asked' : null, what);
      }
      assert.equal(textOf(client, r), `Hello from the mock ${provider} provider. `, what);
    }
    const recs = await take();
    assert.equal(recs.length, 2, what);
    for (const rec of recs) {
      if (provider === 'openai') assert.deepEqual(rec.json.stop, ['You asked'], what);
      else assert.deepEqual(rec.json.stop_sequences, ['You asked'], what);
    }
  }
});

// --- Thinking ----------------------------------------------------------------------

test('thinking: an Anthropic client\'s thinking goes back with its signature unchanged (same-API)', { skip: SKIP },
  async () => {
    const thinking = { type: 'enabled', budget_tokens: 1024 };
    const client = an('anthropic');
    for (const stream of [false, true]) {
      const body = msgs([user('Why is the sky blue?')], { thinking });
      const first = stream ? await client.messages.stream(body).finalMessage() : await client.messages.create(body);
      assert.deepEqual(first.content.map((b) => b.type), ['thinking', 'text']);
      assert.match(first.content[0].signature, /^[A-Za-z0-9+/]+=*$/);
      const next = msgs([user('Why is the sky blue?'), assistant(first.content), user('And at sunset?')], { thinking });
      const second = await client.messages.create(next);
      assert.equal(second.content[0].type, 'thinking');
      const recs = await take();
      assert.equal(recs.length, 2);
      assert.deepEqual(recs[0].json.thinking, thinking);
      assert.deepEqual(recs[1].json.messages[1].content[0], first.content[0], 'the block as the client got it');
      assert.equal(recs[1].thinking_verified, true, 'the upstream verified the signature');
    }
  });

test('thinking: an OpenAI client gets reasoning_content and thinking_blocks from Anthropic and sends them back',
  { skip: SKIP }, async () => {
    const client = oa('anthropic');
    for (const stream of [false, true]) {
      const body = chat([user('Why is the sky blue?')], { reasoning_effort: 'high' });
      const first = stream ? await client.chat.completions.stream(body).finalChatCompletion()
        : await client.chat.completions.create(body);
      const m = first.choices[0].message;
      assert.match(m.content, /^Hello from the mock anthropic provider/);
      assert.equal(m.thinking_blocks.length, 1, JSON.stringify(m));
      const block = m.thinking_blocks[0];
      assert.equal(block.type, 'thinking');
      assert.match(block.thinking, /^The user asks: "Why is the sky blue\?"/);
      assert.match(block.signature, /^[A-Za-z0-9+/]+=*$/);
      if (!stream) assert.equal(m.reasoning_content, block.thinking);
      // The assistant message goes back as the SDK gave it.
      const back = { role: 'assistant', content: m.content, thinking_blocks: m.thinking_blocks };
      if (!stream) back.reasoning_content = m.reasoning_content;
      await client.chat.completions.create(chat([user('Why is the sky blue?'), back, user('And at sunset?')],
        { reasoning_effort: 'high' }));
      const recs = await take();
      assert.equal(recs.length, 2);
      assert.ok(recs.every((x) => providerOf(x) === 'anthropic'));
      assert.equal(recs[0].json.output_config.effort, 'high');
      const sentBack = recs[1].json.messages[1];
      assert.equal(sentBack.role, 'assistant');
      assert.deepEqual(sentBack.content[0], { type: 'thinking', thinking: block.thinking, signature: block.signature });
      assert.deepEqual(sentBack.content[1], { type: 'text', text: m.content });
      assert.equal(recs[1].thinking_verified, true, 'the upstream verified the signature');
    }
  });

test('thinking: what OpenAI cannot take of an Anthropic client\'s thinking is refused by name, or dropped',
  { skip: SKIP }, async () => {
    const thinking = { type: 'enabled', budget_tokens: 1024 };
    await assertRefused('anthropic', an('openai').messages.create(msgs([user('Why?')], { thinking })),
      'reasoning.budget_tokens is not supported by provider openai (OpenAI takes an effort level, not a token budget)');
    const { data, response } = await an('openai', { 'X-Aiorch-Allow-Drop': 'reasoning.budget_tokens' })
      .messages.create(msgs([user('Why?')], { thinking })).withResponse();
    assert.equal(response.headers.get('x-aiorch-dropped'), 'reasoning.budget_tokens');
    assert.match(textOf('anthropic', data), /^Hello from the mock openai provider/);
    const rec = await one();
    assert.equal(providerOf(rec), 'openai');
    assert.equal(rec.json.reasoning_effort, undefined);
    assert.equal(JSON.stringify(rec.json).includes('budget'), false);
    // thinking sent back: OpenAI takes no reasoning in a request
    const first = await an('anthropic').messages.create(msgs([user('Why?')], { thinking }));
    await take();
    const next = msgs([user('Why?'), assistant(first.content), user('And then?')]);
    await assertRefused('anthropic', an('openai').messages.create(next),
      'thinking is not supported by provider openai (Chat Completions takes no reasoning back in a request)');
    const dropped = await an('openai', { 'X-Aiorch-Allow-Drop': 'thinking' }).messages.create(next).withResponse();
    assert.equal(dropped.response.headers.get('x-aiorch-dropped'), 'thinking');
    const rec2 = await one();
    assert.deepEqual(rec2.json.messages[1], { role: 'assistant', content: first.content[1].text });
  });

test('reasoning: an OpenAI client\'s reasoning_effort reaches OpenAI as it came', { skip: SKIP }, async () => {
  const r = await oa('openai').chat.completions.create(chat([user('hi')], { reasoning_effort: 'high' }));
  assert.ok(r.usage.completion_tokens_details.reasoning_tokens > 0, JSON.stringify(r.usage));
  const rec = await one();
  assert.equal(rec.json.reasoning_effort, 'high');
});

// --- Prompt caching, prefill -------------------------------------------------------

// A conversation with cache_control on a system block, a tool and a message block.
const cachedBody = (extra = {}) => msgs([user([
  { type: 'text', text: `Summarise ${randomUUID()}`, cache_control: { type: 'ephemeral' } },
])], {
  system: [{ type: 'text', text: 'You summarise. '.repeat(50), cache_control: { type: 'ephemeral', ttl: '1h' } }],
  tools: [{ ...ANTHROPIC_TOOLS[0], cache_control: { type: 'ephemeral' } }],
  ...extra,
});

test('cache_control: passed to Anthropic as it came; to OpenAI refused by name, or dropped and said',
  { skip: SKIP }, async () => {
    // same-API: every marker reaches the upstream, which caches
    const body = cachedBody();
    const first = await an('anthropic').messages.create(body);
    const second = await an('anthropic').messages.stream(body).finalMessage();
    assert.ok(first.usage.cache_creation_input_tokens > 0, JSON.stringify(first.usage));
    assert.equal(second.usage.cache_read_input_tokens, first.usage.cache_creation_input_tokens);
    const recs = await take();
    assert.equal(recs.length, 2);
    for (const rec of recs) {
      assert.deepEqual(rec.json.system, body.system);
      assert.deepEqual(rec.json.tools, body.tools);
      assert.deepEqual(rec.json.messages, body.messages);
    }
    // cross-API: refused by name, plain and streamed
    const message = 'cache_control is not supported by provider openai (OpenAI caches prompt prefixes by itself: '
      + 'there is no per-block marker)';
    await assertRefused('anthropic', an('openai').messages.create(body), message);
    await assertRefused('anthropic', an('openai').messages.stream(body).finalMessage(), message);
    // dropped when the request allows it: the answer says so
    for (const stream of [false, true]) {
      const client = an('openai', { 'X-Aiorch-Allow-Drop': 'cache_control' });
      const { data, response } = stream
        ? await client.messages.create({ ...body, stream: true }).withResponse()
        : await client.messages.create(body).withResponse();
      assert.equal(response.headers.get('x-aiorch-dropped'), 'cache_control');
      if (stream) for await (const ev of data) assert.ok(ev.type);
      else assert.match(textOf('anthropic', data), /^Hello from the mock openai provider/);
      const rec = await one();
      assert.equal(providerOf(rec), 'openai');
      assert.equal(rec.body.includes('cache_control'), false, rec.body);
      assert.deepEqual(rec.json.messages[0], { role: 'system', content: [{ type: 'text', text: body.system[0].text }] });
      assert.equal(rec.json.messages[1].role, 'user');
      assert.equal(rec.json.tools[0].function.name, 'get_weather');
    }
  });

test('prefill: Anthropic continues a last assistant turn; to OpenAI it is refused by name', { skip: SKIP },
  async () => {
    const body = msgs([user('Greek name for the Sun? (A) Sol (B) Helios'), assistant('The best answer is (')]);
    const r = await an('anthropic').messages.create(body);
    assert.equal(r.stop_reason, 'end_turn');
    const rec = await one();
    assert.deepEqual(rec.json.messages, body.messages);
    await assertRefused('anthropic', an('openai').messages.create(body),
      'prefill is not supported by provider openai (Chat Completions answers a last assistant message instead of '
      + 'continuing it)');
    await assertRefused('anthropic', an('openai').messages.stream(body).finalMessage(),
      'prefill is not supported by provider openai (Chat Completions answers a last assistant message instead of '
      + 'continuing it)');
    const { response } = await an('openai', { 'X-Aiorch-Allow-Drop': 'prefill' }).messages.create(body).withResponse();
    assert.equal(response.headers.get('x-aiorch-dropped'), 'prefill');
    assert.deepEqual((await one()).json.messages, [{ role: 'user', content: body.messages[0].content }]);
  });

// --- OpenAI's sampling fields ------------------------------------------------------

test('n, logprobs, metadata, user, seed, penalties: passed to OpenAI; refused by Anthropic by name, or dropped',
  { skip: SKIP }, async () => {
    const fields = {
      n: 2, logprobs: true, top_logprobs: 2, metadata: { team: 'fid' }, user: 'user-42', seed: 7,
      presence_penalty: 0.5, frequency_penalty: 0.25, store: true,
    };
    const r = await oa('openai').chat.completions.create(chat([user('Pick')], fields));
    assert.deepEqual(r.choices.map((c) => c.index), [0, 1]);
    assert.equal(r.choices[1].message.content, `${r.choices[0].message.content} (choice 1)`);
    assert.equal(r.choices[0].logprobs.content.map((t) => t.token).join(''), r.choices[0].message.content);
    assert.equal(r.choices[0].logprobs.content[0].top_logprobs.length, 2);
    const streamed = await oa('openai').chat.completions.stream(chat([user('Pick')], fields)).finalChatCompletion();
    assert.deepEqual(streamed.choices.map((c) => c.message.content), r.choices.map((c) => c.message.content));
    assert.equal(streamed.choices[1].logprobs.content.map((t) => t.token).join(''), r.choices[1].message.content);
    for (const rec of await take()) {
      for (const [k, v] of Object.entries(fields)) assert.deepEqual(rec.json[k], v, k);
    }
    // Anthropic: each refused by its own name
    const refusals = [
      ['n', 2, 'Anthropic answers with one message per request'],
      ['logprobs', true, 'Anthropic returns no log-probabilities'],
      ['top_logprobs', 2, 'Anthropic returns no log-probabilities'],
      ['metadata', { team: 'fid' }, 'Anthropic\'s metadata holds only user_id'],
      ['seed', 7, 'Anthropic has no seed'],
      ['presence_penalty', 0.5, 'Anthropic has no repetition penalties'],
      ['frequency_penalty', 0.25, 'Anthropic has no repetition penalties'],
    ];
    for (const [field, value, why] of refusals) {
      await assertRefused('openai', oa('anthropic').chat.completions.create(chat([user('Pick')], { [field]: value })),
        `${field} is not supported by provider anthropic (${why})`);
    }
    // user is Anthropic's metadata.user_id, both ways
    await oa('anthropic').chat.completions.create(chat([user('Pick')], { user: 'user-42' }));
    assert.deepEqual((await one()).json.metadata, { user_id: 'user-42' });
    await an('openai').messages.create(msgs([user('Pick')], { metadata: { user_id: 'user-43' } }));
    const back = await one();
    assert.equal(back.json.user, 'user-43');
    assert.equal(back.json.metadata, undefined);
    // dropped when allowed, and said; store is OpenAI's own: refused until dropped too
    const drop = 'n,logprobs,top_logprobs,metadata,seed,presence_penalty,frequency_penalty,store';
    for (const stream of [false, true]) {
      const client = oa('anthropic', { 'X-Aiorch-Allow-Drop': drop });
      const { data, response } = stream
        ? await client.chat.completions.create(chat([user('Pick')], { ...fields, stream: true })).withResponse()
        : await client.chat.completions.create(chat([user('Pick')], fields)).withResponse();
      assert.deepEqual(response.headers.get('x-aiorch-dropped').split(',').sort(),
        ['frequency_penalty', 'logprobs', 'metadata', 'n', 'presence_penalty', 'seed', 'store', 'top_logprobs']);
      let text = '';
      if (stream) for await (const c of data) text += c.choices[0]?.delta?.content || '';
      else text = data.choices[0].message.content;
      assert.match(text, /^Hello from the mock anthropic provider/);
      assert.equal(stream ? 1 : data.choices.length, 1);
      const rec = await one();
      assert.deepEqual(rec.json.metadata, { user_id: 'user-42' });
      for (const k of drop.split(',')) if (k !== 'metadata') assert.equal(rec.json[k], undefined, k);
    }
  });

// --- Fields the model does not know ------------------------------------------------

test('unknown fields: same-API they reach the upstream unchanged; cross-API they are refused by name',
  { skip: SKIP }, async () => {
    const oaBody = chat([{ role: 'user', content: [{ type: 'text', text: 'hi', fid_part_note: 'p' }],
      fid_message_note: 'm' }], { fid_top_level: { deep: [1, {}, []], flag: null } });
    await oa('openai').chat.completions.create(oaBody);
    const oaRec = await one();
    assert.deepEqual(oaRec.json, oaBody);
    const anBody = msgs([{ role: 'user', content: [{ type: 'text', text: 'hi', fid_part_note: 'p' }] }],
      { fid_top_level: { deep: [1, {}, []] } });
    await an('anthropic').messages.create(anBody);
    const anRec = await one();
    assert.deepEqual(anRec.json, anBody);
    // cross-API: each by its own name, where it was
    await assertRefused('openai', oa('anthropic').chat.completions.create(chat([user('hi')],
      { fid_top_level: { deep: [1, {}, []], flag: null } })),
    'fid_top_level is not supported by provider anthropic (a field of the openai API; provider anthropic speaks '
      + 'anthropic)');
    await assertRefused('openai', oa('anthropic').chat.completions.create(
      chat([{ role: 'user', content: 'hi', fid_message_note: 'm' }])),
    'fid_message_note is not supported by provider anthropic (a field of the openai API; provider anthropic speaks '
      + 'anthropic)');
    await assertRefused('openai', oa('anthropic').chat.completions.create(
      chat([{ role: 'user', content: [{ type: 'text', text: 'hi', fid_part_note: 'p' }] }])),
    'fid_part_note is not supported by provider anthropic (a field of the openai API; provider anthropic speaks '
      + 'anthropic)');
    await assertRefused('anthropic', an('openai').messages.create(msgs([user('hi')], { fid_top_level: 1 })),
      'fid_top_level is not supported by provider openai (a field of the anthropic API; provider openai speaks openai)');
    await assertRefused('anthropic', an('openai').messages.create(
      msgs([{ role: 'user', content: [{ type: 'text', text: 'hi', fid_part_note: 'p' }] }])),
    'fid_part_note is not supported by provider openai (a field of the anthropic API; provider openai speaks openai)');
    const { response } = await an('openai', { 'X-Aiorch-Allow-Drop': 'fid_top_level,fid_part_note' })
      .messages.create(anBody).withResponse();
    assert.deepEqual(response.headers.get('x-aiorch-dropped').split(',').sort(), ['fid_part_note', 'fid_top_level']);
    assert.deepEqual((await one()).json.messages, [{ role: 'user', content: [{ type: 'text', text: 'hi' }] }]);
  });

// --- Same-API passthrough ----------------------------------------------------------

// The same answer whatever its id (each upstream answer has its own).
const sansId = (v) => JSON.parse(JSON.stringify(v).replace(/"(chatcmpl-mock|msg_mock|call_mock|toolu_)\w+"/g, '"<id>"'));

test('same-API passthrough: the upstream gets the bytes the SDK sends it directly, and the answer comes back as the '
  + 'upstream sent it', { skip: SKIP }, async () => {
  const oaBodies = [
    chat([{ role: 'developer', content: 'Be terse.' }, user([{ type: 'text', text: 'Weather in Oslo? get_weather' },
      { type: 'image_url', image_url: { url: IMAGE_URL, detail: 'high' } }])], {
      tools: OPENAI_TOOLS, tool_choice: 'auto', parallel_tool_calls: false, temperature: 1.7, top_p: 0.9,
      max_completion_tokens: 300, service_tier: 'flex', prediction: { type: 'content', content: 'x' },
      stream_options: undefined,
    }),
    chat([user('hi')], { n: 2, logprobs: true, top_logprobs: 1, seed: 3, service_tier: 'flex' }),
  ];
  for (const body of oaBodies) {
    for (const stream of [false, true]) {
      const b = stream ? { ...body, stream: true, stream_options: { include_usage: true } } : body;
      const run = async (client) => {
        if (!stream) return client.chat.completions.create(b).withResponse();
        const { data, response } = await client.chat.completions.create(b).withResponse();
        const chunks = [];
        for await (const c of data) chunks.push(c);
        return { data: chunks, response };
      };
      const direct = await run(oaDirect());
      const [d] = await take();
      const through = await run(oa());
      const [g] = await take();
      assert.equal(g.body, d.body, 'the same bytes');
      assert.equal(g.headers.authorization, `Bearer ${OPENAI_KEY}`);
      assert.deepEqual(sansId(through.data), sansId(direct.data));
      const answers = stream ? through.data : [through.data];
      for (const a of answers) {
        assert.match(a.id, /^chatcmpl-mock\d+$/, 'the upstream\'s id');
        assert.match(a.system_fingerprint, /^fp_/);
        assert.equal(a.service_tier, 'flex');
      }
      assert.equal(through.response.headers.get('x-aiorch-provider'), 'openai');
    }
  }
  const anBodies = [
    msgs([user([{ type: 'text', text: 'Weather in Oslo? get_weather' },
      { type: 'image', source: { type: 'url', url: IMAGE_URL } }])], {
      system: [{ type: 'text', text: 'Be terse.' }], tools: ANTHROPIC_TOOLS,
      tool_choice: { type: 'auto', disable_parallel_tool_use: true }, temperature: 0.3, top_k: 5,
      metadata: { user_id: 'u-1' }, service_tier: 'auto',
    }),
    msgs([user('Why?')], { thinking: { type: 'enabled', budget_tokens: 2048 }, stop_sequences: ['zzz'] }),
  ];
  const betas = 'fid-beta-2026-01-01,other-beta-2025-05-05';
  for (const body of anBodies) {
    for (const stream of [false, true]) {
      const b = stream ? { ...body, stream: true } : body;
      const run = async (client) => {
        if (!stream) return client.messages.create(b).withResponse();
        const { data, response } = await client.messages.create(b).withResponse();
        const events = [];
        for await (const ev of data) events.push(ev);
        return { data: events, response };
      };
      const direct = await run(anDirect({ defaultHeaders: { 'anthropic-beta': betas } }));
      const [d] = await take();
      const through = await run(an(null, { 'anthropic-beta': betas }));
      const [g] = await take();
      assert.equal(g.body, d.body, 'the same bytes');
      assert.equal(g.headers['anthropic-version'], d.headers['anthropic-version']);
      assert.equal(g.headers['anthropic-beta'], betas);
      assert.equal(g.headers['x-api-key'], ANTHROPIC_KEY);
      assert.deepEqual(sansId(through.data), sansId(direct.data));
      const first = stream ? through.data[0].message : through.data;
      assert.match(first.id, /^msg_mock\d+$/, 'the upstream\'s id');
      assert.equal(through.response.headers.get('x-aiorch-provider'), 'anthropic');
    }
  }
  // the headers of the client's own (the SDK's x-stainless-*, the gateway's x-aiorch-*) stay with the gateway
  await an('anthropic', { 'anthropic-beta': betas }).messages.create(msgs([user('hi')]));
  const rec = await one();
  assert.deepEqual(Object.keys(rec.headers).filter((h) => /^x-(stainless|aiorch)/.test(h)), []);
  // cross-API, the beta header goes nowhere: OpenAI has no betas
  await an('openai', { 'anthropic-beta': betas }).messages.create(msgs([user('hi')]));
  assert.equal((await one()).headers['anthropic-beta'], undefined);
});

// --- Upstream refusals ------------------------------------------------------------

test('an upstream\'s 400 reaches the client as a 400: as the upstream wrote it same-API, in the client\'s shape '
  + 'cross-API; the SDK does not retry it', { skip: SKIP }, async () => {
  // a tool result that answers no tool call: both APIs refuse it
  const oaBody = chat([user('hi'), { role: 'tool', tool_call_id: 'call_x', content: '1' }]);
  const anBody = msgs([user('hi'), user([{ type: 'tool_result', tool_use_id: 'toolu_x', content: '1' }])]);
  for (const [client, provider] of PATHS) {
    const what = label(client, provider);
    for (const stream of [false, true]) {
      const call = client === 'openai'
        ? oa(provider, {}, { maxRetries: 2 }).chat.completions.create({ ...oaBody, stream })
        : an(provider, {}, { maxRetries: 2 }).messages.create({ ...anBody, stream });
      await assert.rejects(call, (err) => {
        assert.equal(err.status, 400, `${what}: ${err.message}`);
        if (client === 'openai') {
          assert.ok(err instanceof OpenAI.BadRequestError, what);
          assert.equal(err.type, 'invalid_request_error', what);
          if (provider === 'openai') {
            assert.equal(err.param, 'messages.[1].role', what);
            assert.match(err.error.message, /must be a response to a preceeding message with 'tool_calls'/);
          } else {
            assert.match(err.error.message, /^provider anthropic refused the request \(HTTP 400\): messages\.1\.content\.0: .*tool_use/, what);
          }
        } else {
          assert.ok(err instanceof Anthropic.BadRequestError, what);
          assert.equal(err.error.type, 'error', what);
          assert.equal(err.error.error.type, 'invalid_request_error', what);
          assert.match(err.error.error.message, provider === 'anthropic' ? /^messages\.1\.content\.0: .*tool_use/
            : /^provider openai refused the request \(HTTP 400\): .*preceeding message with 'tool_calls'/, what);
        }
        return true;
      });
      const recs = await take();
      assert.equal(recs.length, 1, `${what}: one upstream request, no retry`);
      assert.ok(recs[0].rejected, what);
    }
  }
});

// --- Strategies --------------------------------------------------------------------

test('strategies skip a provider that cannot take the request, with the reason; temperature 1.5 goes to OpenAI',
  { skip: SKIP }, async () => {
    for (const strategy of ['fallback', 'fastest', 'hedged', 'parallel']) {
      const headers = { 'X-Aiorch-Strategy': strategy };
      const client = oa('anthropic,openai', headers);
      const body = chat([user('Warm?')], { temperature: 1.5 });
      const { data, response } = await client.chat.completions.create(body).withResponse();
      assert.equal(response.headers.get('x-aiorch-provider'), 'openai', strategy);
      assert.equal(response.headers.get('x-aiorch-attempts'), 'anthropic:unsupported,openai:success', strategy);
      assert.equal(data.choices.length, 1, strategy);
      assert.match(data.choices[0].message.content, /^Hello from the mock openai provider/, strategy);
      const streamed = await client.chat.completions.stream(body).finalChatCompletion();
      assert.match(streamed.choices[0].message.content, /^Hello from the mock openai provider/, strategy);
      const recs = await take();
      assert.deepEqual(recs.map(providerOf), ['openai', 'openai'], strategy);
      assert.ok(recs.every((x) => x.json.temperature === 1.5), strategy);
      // the native endpoint shows why
      const r = await fetch(gw.url + '/v1/orchestrate', {
        method: 'POST', headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ messages: [user('Warm?')], temperature: 1.5, strategy,
          providers: ['anthropic', 'openai'] }),
      });
      assert.equal(r.status, 200, strategy);
      assert.equal(r.headers.get('x-aiorch-attempts'), 'anthropic:unsupported,openai:success', strategy);
      const out = await r.json();
      const answer = Array.isArray(out) ? out[0] : out;
      assert.equal(answer.ia_provider_name, 'openai', strategy);
      assert.deepEqual(answer.metadata.attempts[0], { provider: 'anthropic', status: 'skipped', kind: 'unsupported',
        note: 'unsupported: temperature' }, strategy);
      assert.deepEqual((await take()).map(providerOf), ['openai'], strategy);
    }
    // none can take it: the first refusal, by name
    await assertRefused('openai', oa('anthropic').chat.completions.create(chat([user('Warm?')], { temperature: 1.5 })),
      "temperature 1.5 is outside anthropic's range 0..1");
  });

// --- A user strategy ---------------------------------------------------------------

// Tries each provider in turn until one answers, caring nothing for streams:
// the commit point is the gateway's to keep, not the strategy's.
const NAIVE = `return function(_, providers, ctx)
  local last
  for _, p in ipairs(providers) do
    last = ctx.call(p)
    if last.status == "success" then
      return last
    end
  end
  return last
end
`;

test('a user strategy from --path streams through the gateway with the commit point kept', { skip: SKIP },
  async () => {
    const dir = join(tmp, 'user');
    mkdirSync(join(dir, 'strategies'), { recursive: true });
    writeFileSync(join(dir, 'strategies', 'fid_naive.lua'), NAIVE);
    const extra = 'default_strategy = "fid_naive", strategies = { "fid_naive" },';
    // openai fails before its first token; then it cuts its stream after some
    const down = await startGateway(gatewayConfig(up, { openaiDirectives: 'fault=500', extra }), ['--path', dir]);
    const cut = await startGateway(gatewayConfig(up, { openaiDirectives: 'fault=cut,chunks=6', extra }),
      ['--path', dir]);
    const both = { 'X-Aiorch-Providers': 'openai,anthropic' };
    const oaOf = (g) => new OpenAI({ baseURL: g.url + '/v1', apiKey: CLIENT_KEY, maxRetries: 0, defaultHeaders: both });
    const anOf = (g) => new Anthropic({ baseURL: g.url, apiKey: CLIENT_KEY, maxRetries: 0, defaultHeaders: both });

    // Before the first token: the next provider takes the stream, unseen.
    {
      const { data, response } = await oaOf(down).chat.completions.create(chat([user('Tell me')], { stream: true }))
        .withResponse();
      let text = '';
      let first;
      for await (const c of data) {
        first = first || c;
        text += c.choices[0]?.delta?.content || '';
      }
      assert.match(text, /^Hello from the mock anthropic provider\. You asked: Tell me$/);
      // the model that answered, not the one that failed
      assert.equal(first.model, ANTHROPIC_DEFAULT);
      assert.equal(response.headers.get('x-aiorch-model'), ANTHROPIC_DEFAULT);
      assert.equal(response.headers.get('x-aiorch-provider'), 'anthropic');
      assert.equal(response.headers.get('x-aiorch-strategy'), 'fid_naive');
      const msg = await anOf(down).messages.stream(msgs([user('Tell me')])).finalMessage();
      assert.match(textOf('anthropic', msg), /^Hello from the mock anthropic provider\. You asked: Tell me$/);
      assert.deepEqual((await take()).map(providerOf), ['openai', 'anthropic', 'openai', 'anthropic']);
    }
    // After it: the stream ends with the API's error, never another provider's text.
    {
      let text = '';
      const stream = await oaOf(cut).chat.completions.create(chat([user('Tell me')], { stream: true }));
      await assert.rejects((async () => {
        for await (const c of stream) text += c.choices[0]?.delta?.content || '';
      })(), (err) => {
        assert.ok(err instanceof OpenAI.APIError, String(err));
        assert.match(err.message, /the upstream stream broke/);
        return true;
      });
      assert.ok(text.length > 0 && 'Hello from the mock openai provider'.startsWith(text), text);
      const s = anOf(cut).messages.stream(msgs([user('Tell me')]));
      let atext = '';
      s.on('text', (t) => { atext += t; });
      await assert.rejects(s.finalMessage(), (err) => {
        assert.ok(err instanceof Anthropic.APIError, String(err));
        assert.match(err.message, /the upstream stream broke/);
        return true;
      });
      assert.ok(atext.length > 0 && 'Hello from the mock openai provider'.startsWith(atext), atext);
      // (the strategy did call anthropic after the cut; none of it reached the client)
      assert.deepEqual((await take()).map(providerOf), ['openai', 'anthropic', 'openai', 'anthropic']);
      // unstreamed, nothing was committed: the strategy's fallback stands
      const whole = await oaOf(cut).chat.completions.create(chat([user('Tell me')]));
      assert.match(whole.choices[0].message.content, /^Hello from the mock anthropic provider/);
      await take();
    }
    // the configuration's list is what clients may choose
    await assertRefused('openai', oaOf(down).chat.completions.create(chat([user('hi')]), {
      headers: { 'X-Aiorch-Strategy': 'fallback' } }), "strategy 'fallback' is not allowed (allowed: fid_naive)");
    await stop(down.child);
    await stop(cut.child);
  });

// --- Every other refusal -----------------------------------------------------------

// What one API has and the other cannot take (docs/fidelity.md): each a
// named 400 in the client's shape, and with X-Aiorch-Allow-Drop a 200 that
// says what it dropped.
const OA_REFUSED = [ // an OpenAI client's, that Anthropic cannot take
  ['message.name', 'Anthropic messages have no participant name',
    chat([{ role: 'user', content: 'hi', name: 'ada' }])],
  ['image.detail', 'Anthropic images have no detail level',
    chat([user([{ type: 'text', text: 'hi' }, { type: 'image_url', image_url: { url: IMAGE_URL, detail: 'low' } }])])],
  ['response_format.json_object', 'Anthropic has no JSON mode without a schema',
    chat([user('Answer in JSON')], { response_format: { type: 'json_object' } })],
  ['tool_call.arguments', 'a `tool_use` input must be a JSON object',
    chat([user('hi'), { role: 'assistant', content: null, tool_calls: [
      { id: 'call_1', type: 'function', function: { name: 'get_time', arguments: '[1]' } }] },
    { role: 'tool', tool_call_id: 'call_1', content: '12:00' }], { tools: OPENAI_TOOLS })],
  ['input_audio', 'a field of the openai API; provider anthropic speaks anthropic',
    chat([user([{ type: 'text', text: 'hi' }, { type: 'input_audio', input_audio: { data: PNG, format: 'wav' } }])])],
];
const AN_REFUSED = [ // an Anthropic client's, that OpenAI cannot take
  ['top_k', 'Chat Completions has no top_k', msgs([user('hi')], { top_k: 5 })],
  ['image.file', '`image_url` takes a URL, not a file id',
    msgs([user([{ type: 'image', source: { type: 'file', file_id: 'file_1' } }, { type: 'text', text: 'hi' }])])],
  ['document.url', '`file` parts take data or a file id, not a URL',
    msgs([user([{ type: 'document', source: { type: 'url', url: 'https://example.com/a.pdf' } },
      { type: 'text', text: 'hi' }])])],
  ['document.text', '`file` parts take base64 data, not plain text',
    msgs([user([{ type: 'document', source: { type: 'text', media_type: 'text/plain', data: 'words' } },
      { type: 'text', text: 'hi' }])])],
  ['tool_result.is_error', '`tool` messages have no error flag',
    msgs([user('get_time'), assistant([{ type: 'tool_use', id: 'toolu_1', name: 'get_time', input: { zone: 'UTC' } }]),
      user([{ type: 'tool_result', tool_use_id: 'toolu_1', content: 'failed', is_error: true }])],
    { tools: ANTHROPIC_TOOLS })],
  ['tool_result.image', '`tool` messages take text only',
    msgs([user('get_time'), assistant([{ type: 'tool_use', id: 'toolu_1', name: 'get_time', input: { zone: 'UTC' } }]),
      user([{ type: 'tool_result', tool_use_id: 'toolu_1',
        content: [{ type: 'image', source: { type: 'base64', media_type: 'image/png', data: PNG } }] }])],
    { tools: ANTHROPIC_TOOLS })],
  ['redacted_thinking', 'Chat Completions takes no reasoning back in a request',
    msgs([user('Why?'), assistant([{ type: 'redacted_thinking', data: 'abc' }, { type: 'text', text: 'Because.' }]),
      user('And?')])],
  ['reasoning.display', 'Chat Completions does not show reasoning',
    msgs([user('Why?')], { thinking: { type: 'adaptive', display: 'summarized' } })],
  ['web_search_20250305', 'a field of the anthropic API; provider openai speaks openai',
    msgs([user('hi')], { tools: [{ type: 'web_search_20250305', name: 'web_search', max_uses: 1 }] })],
];

test('every other field one API cannot take from the other: a named 400, or dropped and said', { skip: SKIP },
  async () => {
    for (const [client, provider, table] of [['openai', 'anthropic', OA_REFUSED], ['anthropic', 'openai', AN_REFUSED]]) {
      for (const [field, why, body] of table) {
        const what = `${label(client, provider)}: ${field}`;
        const send = (c) => (client === 'openai' ? c.chat.completions.create(body) : c.messages.create(body));
        await assertRefused(client, send(client === 'openai' ? oa(provider) : an(provider)),
          `${field} is not supported by provider ${provider} (${why})`);
        const c = client === 'openai' ? oa(provider, { 'X-Aiorch-Allow-Drop': field })
          : an(provider, { 'X-Aiorch-Allow-Drop': field });
        const { response } = await send(c).withResponse();
        assert.equal(response.headers.get('x-aiorch-dropped'), field, what);
        assert.equal(response.headers.get('x-aiorch-provider'), provider, what);
        const rec = await one();
        assert.equal(providerOf(rec), provider, what);
        assert.equal(rec.rejected, undefined, what);
      }
    }
  });

// --- The configuration's say -------------------------------------------------------

test('configuration: drop_unsupported drops without the header; models and model_prefixes route',
  { skip: SKIP }, async () => {
    const g = await startGateway(gatewayConfig(up, { extra: 'drop_unsupported = { "cache_control" },' })
      .replace('priority = 1 }', 'priority = 1, model_prefixes = { "fid-", "gpt-" } }')
      .replace('priority = 2 }', 'priority = 2, models = { "house-model-1" } }'));
    const client = new Anthropic({ baseURL: g.url, apiKey: CLIENT_KEY, maxRetries: 0,
      defaultHeaders: { 'X-Aiorch-Providers': 'openai' } });
    const { response } = await client.messages.create(cachedBody()).withResponse();
    assert.equal(response.headers.get('x-aiorch-dropped'), 'cache_control');
    assert.equal((await one()).body.includes('cache_control'), false);
    // what the configuration does not allow is still refused by name
    await assertRefused('anthropic', client.messages.create(msgs([user('hi')], { top_k: 3 })),
      'top_k is not supported by provider openai (Chat Completions has no top_k)');
    // openai serves fid-* and gpt-* here, and no longer o1*, o3*...
    const o = new OpenAI({ baseURL: g.url + '/v1', apiKey: CLIENT_KEY, maxRetries: 0 });
    for (const model of ['fid-model-1', 'gpt-4o']) {
      const { data, response: r } = await o.chat.completions.create(chat([user('hi')], { model })).withResponse();
      assert.equal(r.headers.get('x-aiorch-provider'), 'openai');
      assert.equal(data.model, model);
      assert.equal((await one()).json.model, model);
    }
    await assert.rejects(o.chat.completions.create(chat([user('hi')], { model: 'o3-mini' })), OpenAI.NotFoundError);
    // a model anthropic lists goes to it, whatever its name
    const { response: listed } = await o.chat.completions.create(chat([user('hi')], { model: 'house-model-1' }))
      .withResponse();
    assert.equal(listed.headers.get('x-aiorch-provider'), 'anthropic');
    assert.equal((await one()).json.model, 'house-model-1');
    await stop(g.child);
  });
