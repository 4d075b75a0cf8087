// Cohere's official client (cohere-ai's CohereClientV2, unchanged: only its
// baseUrl and token set) against the mock's Chat v2 (tests/mock_server.lua):
// every answer the mock gives, plain and streamed, parses in the SDK and
// says what the mock meant, and its errors are the SDK's error classes.
// Then the OpenAI and Anthropic clients against a real `aiorch serve` whose
// provider is cohere (that mock behind it): answers and streams translated,
// tool-call deltas included.
//   node --test tests/sdk/cohere.test.mjs     (from the repository root; CTest: sdk_clients)
// AIORCH_BUILD names the build directory (default: build).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CohereClientV2, Cohere, CohereError } from 'cohere-ai';
import OpenAI from 'openai';
import Anthropic from '@anthropic-ai/sdk';
import { AIORCH, HOST, assertValid, hasServe, mockPrefix, startMock, startServe, stopAll } from './support.mjs';

const MODEL = 'command-a-03-2025';
const PNG = 'iVBORw0KGgo='; // the PNG signature
const MOCK_TEXT = /^Hello from the mock cohere provider\. You asked: /;
const PREAMBLE_TOKENS = 64; // what the mock adds to billed input tokens in usage.tokens

const SKIP = hasServe() ? false : `${AIORCH} is not built (or has no 'serve' command)`;

// --- A little JSON Schema, for the arguments and JSON answers ----------------

const WEATHER = {
  type: 'object',
  properties: {
    city: { type: 'string' },
    unit: { type: 'string', enum: ['celsius', 'fahrenheit'] },
    days: { type: 'integer', minimum: 1, maximum: 7 },
    tags: { type: 'array', items: { type: 'string' }, minItems: 1 },
  },
  required: ['city', 'unit', 'days', 'tags'],
  additionalProperties: false,
};
const TIME = { type: 'object', properties: { zone: { type: 'string' } }, required: ['zone'] };
const PERSON = {
  type: 'object',
  properties: { name: { type: 'string' }, age: { type: 'integer', minimum: 0, maximum: 150 },
    pets: { type: 'array', items: { $ref: '#/$defs/pet' } } },
  required: ['name', 'age', 'pets'],
  $defs: { pet: { type: 'object', properties: { kind: { type: 'string', enum: ['cat', 'dog'] } }, required: ['kind'] } },
};
const COHERE_TOOLS = [
  { type: 'function', function: { name: 'get_weather', description: 'Weather now', parameters: WEATHER } },
  { type: 'function', function: { name: 'get_time', description: 'Time now', parameters: TIME } },
];

// --- Processes: the mock, the gateway ----------------------------------------

let tmp;

// `aiorch serve` whose one provider is cohere, at the mock (with directives).
async function startGateway(mockPort, directives = '') {
  const config = join(tmp, `gateway-${directives || 'plain'}.lua`);
  writeFileSync(config,
    `return { providers = { cohere = { base_url = "http://${HOST}:${mockPort}${mockPrefix(directives)}" } } }\n`);
  return startServe(['--workers', '0', '--config', config],
    { CO_API_KEY: 'co-test-key', OPENAI_API_KEY: '', ANTHROPIC_API_KEY: '' });
}

let base = '';
let gw, limited;

before(async () => {
  if (SKIP) return;
  tmp = mkdtempSync(join(tmpdir(), 'aiorch-cohere-'));
  const { port, url } = await startMock(['--port', '0']);
  base = url;
  gw = await startGateway(port);
  limited = await startGateway(port, 'fault=429,retry_after=1');
});

after(async () => {
  await stopAll();
  if (tmp) rmSync(tmp, { recursive: true, force: true });
});

// A client of the mock, with directives in the path when given ('a=1,b=2').
const cohere = (dirs) => new CohereClientV2({ token: 'co-test', maxRetries: 0,
  baseUrl: `${base}${dirs ? `/_mock/${dirs}` : ''}` });
const user = (content) => ({ role: 'user', content });
const body = (messages, extra = {}) => ({ model: MODEL, messages, ...extra });

// A stream's events by type, its text, tool plan, calls and end.
async function collect(stream) {
  const out = { types: [], text: '', thinking: '', plan: '', calls: [], end: null, logprobs: [] };
  for await (const ev of stream) {
    out.types.push(ev.type);
    if (ev.type === 'content-delta') {
      out.text += ev.delta.message.content.text ?? '';
      out.thinking += ev.delta.message.content.thinking ?? '';
      if (ev.logprobs) out.logprobs.push([ev.delta.message.content.text, ev.logprobs]);
    } else if (ev.type === 'tool-plan-delta') {
      out.plan += ev.delta.message.toolPlan;
    } else if (ev.type === 'tool-call-start') {
      const tc = ev.delta.message.toolCalls;
      out.calls[ev.index] = { id: tc.id, name: tc.function.name, args: tc.function.arguments };
    } else if (ev.type === 'tool-call-delta') {
      out.calls[ev.index].args += ev.delta.message.toolCalls.function.arguments;
    } else if (ev.type === 'message-end') {
      out.end = ev.delta;
    }
  }
  return out;
}

// --- Cohere's SDK against the mock ---------------------------------------------

test('cohere: chat and chatStream, the same answer with usage in billed_units and tokens', { skip: SKIP },
  async () => {
    const client = cohere('chunks=4');
    const r = await client.chat(body([{ role: 'system', content: 'Be kind.' }, user('What is a monad?')]));
    assert.equal(r.message.role, 'assistant');
    assert.equal(r.message.content.length, 1);
    assert.equal(r.message.content[0].type, 'text');
    assert.match(r.message.content[0].text, MOCK_TEXT);
    assert.ok(r.message.content[0].text.includes('What is a monad?'));
    assert.equal(r.finishReason, 'COMPLETE');
    assert.match(r.id, /^[0-9a-f-]{36}$/);
    const { billedUnits, tokens, cachedTokens } = r.usage;
    assert.ok(billedUnits.inputTokens > 0 && billedUnits.outputTokens > 0, JSON.stringify(r.usage));
    assert.equal(tokens.inputTokens, billedUnits.inputTokens + PREAMBLE_TOKENS);
    assert.equal(tokens.outputTokens, billedUnits.outputTokens);
    assert.equal(cachedTokens, 0);

    const s = await collect(await client.chatStream(body([{ role: 'system', content: 'Be kind.' },
      user('What is a monad?')])));
    assert.deepEqual(s.types, ['message-start', 'content-start', 'content-delta', 'content-delta', 'content-delta',
      'content-delta', 'content-end', 'message-end']);
    assert.equal(s.text, r.message.content[0].text);
    assert.equal(s.end.finishReason, 'COMPLETE');
    assert.deepEqual(s.end.usage, r.usage);
  });

test('cohere: tool calls with a tool plan, plain and streamed, then the results quoted', { skip: SKIP }, async () => {
  const client = cohere();
  const ask = body([user('Weather and time in Paris: get_weather and get_time')], { tools: COHERE_TOOLS });
  const r = await client.chat(ask);
  assert.equal(r.finishReason, 'TOOL_CALL');
  assert.equal(r.message.toolPlan, 'I will use get_weather and get_time to answer this.');
  assert.deepEqual(r.message.toolCalls.map((c) => c.function.name), ['get_weather', 'get_time']);
  assert.equal(new Set(r.message.toolCalls.map((c) => c.id)).size, 2, 'distinct ids');
  for (const c of r.message.toolCalls) {
    assert.equal(c.type, 'function');
    assertValid(c.function.name === 'get_weather' ? WEATHER : TIME, JSON.parse(c.function.arguments));
  }

  const s = await collect(await client.chatStream(ask));
  assert.equal(s.plan, r.message.toolPlan);
  assert.deepEqual(s.calls.map((c) => [c.name, c.args]),
    r.message.toolCalls.map((c) => [c.function.name, c.function.arguments]));
  assert.equal(s.end.finishReason, 'TOOL_CALL');
  assert.ok(s.types.indexOf('tool-plan-delta') < s.types.indexOf('tool-call-start'), s.types.join());
  assert.equal(s.types.filter((t) => t === 'tool-call-end').length, 2);

  // The assistant turn goes back as the SDK gave it, with the results.
  const next = await client.chat(body([...ask.messages, { role: 'assistant', toolPlan: r.message.toolPlan,
    toolCalls: r.message.toolCalls }, ...r.message.toolCalls.map((c, i) => ({ role: 'tool', toolCallId: c.id,
    content: [{ type: 'text', text: i === 0 ? '22 C, sunny' : '12:00' }] }))], { tools: COHERE_TOOLS }));
  assert.equal(next.finishReason, 'COMPLETE');
  const [a, b] = r.message.toolCalls.map((c) => c.id);
  assert.ok(next.message.content[0].text.endsWith(`Tool results: [${a}] 22 C, sunny; [${b}] 12:00`),
    next.message.content[0].text);

  // toolChoice: REQUIRED calls even unasked (tool_calls=3 of them); NONE answers in text.
  const forced = await cohere('tool_calls=3').chat(body([user('Hi')], { tools: COHERE_TOOLS, toolChoice: 'REQUIRED' }));
  assert.deepEqual(forced.message.toolCalls.map((c) => c.function.name), ['get_weather', 'get_time', 'get_weather']);
  const none = await client.chat({ ...ask, toolChoice: 'NONE' });
  assert.equal(none.finishReason, 'COMPLETE');
  assert.equal(none.message.toolCalls, undefined);
});

test('cohere: JSON output, with and without a schema', { skip: SKIP }, async () => {
  const client = cohere();
  const ask = body([user('A person, as JSON.')], { responseFormat: { type: 'json_object', jsonSchema: PERSON } });
  const r = await client.chat(ask);
  const person = JSON.parse(r.message.content[0].text);
  assertValid(PERSON, person);
  const s = await collect(await client.chatStream(ask));
  assert.deepEqual(JSON.parse(s.text), person);
  const j = await client.chat(body([user('hi, in JSON')], { responseFormat: { type: 'json_object' } }));
  assert.match(JSON.parse(j.message.content[0].text).answer, MOCK_TEXT);
});

test('cohere: stop sequences, max_tokens, thinking, images, logprobs', { skip: SKIP }, async () => {
  const client = cohere('text=one%20two%20three%20four');
  for (const r of [await client.chat(body([user('count')], { stopSequences: ['three'] }))]) {
    assert.equal(r.message.content[0].text, 'one two ');
    assert.equal(r.finishReason, 'STOP_SEQUENCE');
  }
  const cut = await collect(await client.chatStream(body([user('count')], { maxTokens: 2 })));
  assert.equal(cut.text, 'one two');
  assert.equal(cut.end.finishReason, 'MAX_TOKENS');

  const think = { type: 'enabled', tokenBudget: 512 };
  const t = await cohere().chat(body([user('Why is the sky blue?')], { thinking: think }));
  assert.deepEqual(t.message.content.map((c) => c.type), ['thinking', 'text']);
  assert.match(t.message.content[0].thinking, /^The user asks: "Why is the sky blue\?"/);
  const ts = await collect(await cohere().chatStream(body([user('Why is the sky blue?')], { thinking: think })));
  assert.equal(ts.thinking, t.message.content[0].thinking);
  assert.equal(ts.text, t.message.content[1].text);

  const seen = await cohere().chat(body([user([{ type: 'text', text: 'What is this?' },
    { type: 'image_url', imageUrl: { url: `data:image/png;base64,${PNG}`, detail: 'low' } }])],
  { documents: [{ data: { title: 'Notes', snippet: 'Cats sleep a lot.' } }] }));
  assert.ok(seen.message.content[0].text.endsWith('I see 1 image and 1 document.'), seen.message.content[0].text);

  const lp = await cohere().chat(body([user('hi')], { logprobs: true }));
  assert.equal(lp.logprobs.map((x) => x.text).join(''), lp.message.content[0].text);
  for (const x of lp.logprobs) assert.ok(x.logprobs[0] < 0 && x.tokenIds.length === 1);
  const lps = await collect(await cohere('chunks=3').chatStream(body([user('hi')], { logprobs: true })));
  assert.equal(lps.logprobs.length, 3);
  for (const [text, item] of lps.logprobs) {
    assert.equal(item.text, text);
    assert.equal(item.tokenIds.length, item.logprobs.length);
  }
});

test('cohere: errors are the SDK\'s error classes, with Cohere\'s {id, message} body', { skip: SKIP }, async () => {
  const cases = [
    ['fault=429', Cohere.TooManyRequestsError, 429],
    ['fault=500', Cohere.InternalServerError, 500],
    ['fault=401', Cohere.UnauthorizedError, 401],
    ['fault=503', Cohere.ServiceUnavailableError, 503],
  ];
  for (const [dirs, cls, status] of cases) {
    for (const call of [(c) => c.chat(body([user('hi')])), (c) => c.chatStream(body([user('hi')]))]) {
      await assert.rejects(call(cohere(dirs)), (err) => {
        assert.ok(err instanceof cls, `${dirs}: ${err.constructor.name}`);
        assert.ok(err instanceof CohereError);
        assert.equal(err.statusCode, status);
        assert.match(err.body.id, /^[0-9a-f-]{36}$/);
        assert.equal(typeof err.body.message, 'string');
        return true;
      });
    }
  }
  // What the API refuses: a 400 naming the field.
  await assert.rejects(cohere().chat(body([user('hi')], { p: 1 })), (err) => {
    assert.ok(err instanceof Cohere.BadRequestError, err.constructor.name);
    assert.match(err.body.message, /^invalid request: p must be a number between 0\.01 and 0\.99/);
    return true;
  });
  await assert.rejects(cohere().chat(body([user('hi'), { role: 'tool', toolCallId: 'x', content: '1' }])),
    Cohere.BadRequestError);
  await assert.rejects(cohere().chat(body([user('hi')], { tools: COHERE_TOOLS,
    responseFormat: { type: 'json_object' } })), Cohere.BadRequestError);
  // A stream whose generation fails ends with message-end ERROR and its error.
  const failed = await collect(await cohere('fault=error200').chatStream(body([user('hi')])));
  assert.equal(failed.end.finishReason, 'ERROR');
  assert.equal(failed.end.error, 'the generation failed');
  // A cut stream or a malformed event fails the iteration, before any message-end.
  for (const dirs of ['fault=cut,chunks=6', 'fault=malformed']) {
    const seen = [];
    await assert.rejects((async () => {
      for await (const ev of await cohere(dirs).chatStream(body([user('hi')]))) seen.push(ev.type);
    })());
    assert.ok(seen.includes('content-delta') && !seen.includes('message-end'), `${dirs}: ${seen.join()}`);
  }
});

// --- OpenAI and Anthropic clients, answered by cohere through aiorch serve -------

const OPENAI_TOOLS = COHERE_TOOLS;
const ANTHROPIC_TOOLS = [
  { name: 'get_weather', description: 'Weather now', input_schema: WEATHER },
  { name: 'get_time', description: 'Time now', input_schema: TIME },
];
const openai = (g, opts = {}) => new OpenAI({ baseURL: g.url + '/v1', apiKey: 'sk-any', maxRetries: 0, ...opts });
const anthropic = (g) => new Anthropic({ baseURL: g.url, apiKey: 'sk-ant-any', maxRetries: 0 });

test('openai client -> cohere: text and a stream with usage, translated', { skip: SKIP }, async () => {
  const client = openai(gw);
  const ask = { model: MODEL, messages: [{ role: 'user', content: 'What is a monad?' }] };
  const { data, response } = await client.chat.completions.create(ask).withResponse();
  assert.equal(response.headers.get('x-aiorch-provider'), 'cohere');
  assert.match(data.choices[0].message.content, MOCK_TEXT);
  assert.equal(data.choices[0].finish_reason, 'stop'); // COMPLETE
  assert.ok(data.usage.prompt_tokens > PREAMBLE_TOKENS, JSON.stringify(data.usage)); // usage.tokens
  assert.equal(data.usage.prompt_tokens_details.cached_tokens, 0);
  let text = '';
  let deltas = 0;
  let finish = null;
  let usage = null;
  for await (const chunk of await client.chat.completions.create({ ...ask, stream: true,
    stream_options: { include_usage: true } })) {
    if (chunk.usage) usage = chunk.usage;
    const c = chunk.choices[0];
    if (c?.delta?.content) { text += c.delta.content; deltas++; }
    if (c?.finish_reason) finish = c.finish_reason;
  }
  assert.ok(deltas >= 2, `deltas: ${deltas}`);
  assert.equal(text, data.choices[0].message.content);
  assert.equal(finish, 'stop');
  assert.equal(usage.prompt_tokens, data.usage.prompt_tokens);
});

test('openai client -> cohere: tool-call deltas, the plan as content, runTools round trip', { skip: SKIP },
  async () => {
    const client = openai(gw);
    const ask = { model: MODEL, tools: OPENAI_TOOLS,
      messages: [{ role: 'user', content: 'Weather and time in Paris: get_weather and get_time' }] };
    const stream = await client.chat.completions.create({ ...ask, stream: true });
    const calls = [];
    let content = '';
    let finish = null;
    let argDeltas = 0;
    for await (const chunk of stream) {
      const d = chunk.choices[0]?.delta ?? {};
      content += d.content ?? '';
      for (const tc of d.tool_calls ?? []) {
        if (tc.id) calls[tc.index] = { id: tc.id, name: tc.function.name, args: tc.function.arguments ?? '' };
        else { calls[tc.index].args += tc.function.arguments; argDeltas++; }
      }
      if (chunk.choices[0]?.finish_reason) finish = chunk.choices[0].finish_reason;
    }
    assert.equal(content, 'I will use get_weather and get_time to answer this.');
    assert.deepEqual(calls.map((c) => c.name), ['get_weather', 'get_time']);
    assert.ok(argDeltas >= 4, `argument deltas: ${argDeltas}`);
    assertValid(WEATHER, JSON.parse(calls[0].args));
    assertValid(TIME, JSON.parse(calls[1].args));
    assert.equal(finish, 'tool_calls');
    const whole = await client.chat.completions.stream(ask).finalChatCompletion();
    assert.deepEqual(whole.choices[0].message.tool_calls.map((c) => c.function.arguments), calls.map((c) => c.args));

    // The SDK's tool runner sends the results back; cohere quotes them.
    const seen = [];
    const runner = client.chat.completions.runTools({ ...ask, stream: true, tools: OPENAI_TOOLS.map((t) => ({ ...t,
      function: { ...t.function, parse: JSON.parse,
        function: (args) => { seen.push(t.function.name); return t.function.name === 'get_weather' ? 'sunny' : '12:00'; } } })) });
    const final = await runner.finalContent();
    assert.deepEqual(seen, ['get_weather', 'get_time']);
    assert.match(final, /Tool results: \[get_weather_mock\w+\] sunny; \[get_time_mock\w+\] 12:00$/);
  });

test('anthropic client -> cohere: text, thinking and tool_use streamed as content blocks', { skip: SKIP },
  async () => {
    const client = anthropic(gw);
    const msg = await client.messages.stream({ model: MODEL, max_tokens: 512,
      messages: [{ role: 'user', content: 'Why is the sky blue?' }],
      thinking: { type: 'enabled', budget_tokens: 1024 } }).finalMessage();
    assert.deepEqual(msg.content.map((b) => b.type), ['thinking', 'text']);
    assert.match(msg.content[0].thinking, /^The user asks: "Why is the sky blue\?"/);
    assert.match(msg.content[1].text, MOCK_TEXT);
    assert.equal(msg.stop_reason, 'end_turn');

    const ask = { model: MODEL, max_tokens: 512, tools: ANTHROPIC_TOOLS,
      messages: [{ role: 'user', content: 'Weather in Paris? Use get_weather.' }] };
    const types = [];
    let partial = '';
    for await (const ev of await client.messages.create({ ...ask, stream: true })) {
      types.push(ev.type === 'content_block_start' ? `start:${ev.content_block.type}` : ev.type);
      if (ev.type === 'content_block_delta' && ev.delta.type === 'input_json_delta') partial += ev.delta.partial_json;
    }
    assert.ok(types.includes('start:text') && types.includes('start:tool_use'), types.join());
    assert.ok(types.indexOf('start:text') < types.indexOf('start:tool_use'), 'the plan comes first');
    assertValid(WEATHER, JSON.parse(partial));
    const whole = await client.messages.stream(ask).finalMessage();
    assert.deepEqual(whole.content.map((b) => b.type), ['text', 'tool_use']);
    assert.equal(whole.content[0].text, 'I will use get_weather to answer this.');
    assert.deepEqual(whole.content[1].input, JSON.parse(partial));
    assert.equal(whole.stop_reason, 'tool_use');

    // The tool_use turn and its result go back: a Cohere tool message, quoted.
    const next = await client.messages.create({ ...ask, messages: [...ask.messages,
      { role: 'assistant', content: whole.content },
      { role: 'user', content: [{ type: 'tool_result', tool_use_id: whole.content[1].id, content: '22 C' }] }] });
    assert.match(next.content[0].text, /Tool results: \[get_weather_mock\w+\] 22 C$/);
  });

test('openai and anthropic clients -> a rate-limited cohere: their own RateLimitError', { skip: SKIP }, async () => {
  await assert.rejects(openai(limited).chat.completions.create({ model: MODEL,
    messages: [{ role: 'user', content: 'hi' }] }), (err) => {
    assert.ok(err instanceof OpenAI.RateLimitError, `${err.constructor.name} ${err.status}`);
    assert.equal(err.headers.get('retry-after'), '1');
    return true;
  });
  await assert.rejects(anthropic(limited).messages.create({ model: MODEL, max_tokens: 64,
    messages: [{ role: 'user', content: 'hi' }] }), Anthropic.RateLimitError);
});
