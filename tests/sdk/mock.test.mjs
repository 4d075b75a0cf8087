// The official OpenAI and Anthropic clients pointed straight at the mock
// providers (tests/mock_server.lua, no gateway): every answer the mocks give
// (tool calls, parallel calls, tool runners, structured output, thinking,
// images, prompt caching, stop sequences, n, logprobs, errors) must parse
// in the SDKs, plain and streamed, and the parsed objects say what the mock
// meant. zod is not installed, so the SDKs' Standard Schema helpers get a
// small JSON Schema validator of this file's own (standardSchema below).
//   node --test tests/sdk/mock.test.mjs     (from the repository root; CTest: sdk_clients)
// AIORCH_BUILD names the build directory (default: build).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import OpenAI from 'openai';
import Anthropic from '@anthropic-ai/sdk';
import { standardResponseFormat, standardFunction } from 'openai/helpers/standard-schema';
import { jsonSchemaOutputFormat } from '@anthropic-ai/sdk/helpers/json-schema';
import { betaTool } from '@anthropic-ai/sdk/helpers/beta/json-schema';
import { betaStandardSchemaOutputFormat } from '@anthropic-ai/sdk/helpers/beta/standard-schema';
import { AIORCH, assertValid, built, schemaIssues, startMock, stopAll } from './support.mjs';

const OPENAI_MODEL = 'gpt-4o';
const ANTHROPIC_MODEL = 'claude-opus-4-8';
const PNG = 'iVBORw0KGgo='; // the PNG signature
const PDF = 'JVBERi0xLjQK'; // %PDF-1.4

const SKIP = built() ? false : `${AIORCH} is not built`;

// --- JSON Schema ---------------------------------------------------------------

// A Standard Schema (what zod, valibot... implement) backed by `schemaIssues`.
function standardSchema(schema) {
  return {
    '~standard': {
      version: 1,
      vendor: 'aiorch-test',
      validate(value) {
        const issues = schemaIssues(schema, value);
        return issues.length ? { issues } : { value };
      },
      jsonSchema: { input: () => structuredClone(schema) },
    },
  };
}

const WEATHER = {
  type: 'object',
  properties: {
    city: { type: 'string', description: 'The city' },
    unit: { type: 'string', enum: ['celsius', 'fahrenheit'] },
    days: { type: 'integer', minimum: 1, maximum: 7 },
    hourly: { type: 'boolean' },
    tags: { type: 'array', items: { type: 'string', minLength: 2 }, minItems: 1 },
    where: {
      type: 'object',
      properties: { lat: { type: 'number', minimum: -90, maximum: 90 }, lon: { type: 'number' } },
      required: ['lat', 'lon'],
      additionalProperties: false,
    },
  },
  required: ['city', 'unit', 'days', 'hourly', 'tags', 'where'],
  additionalProperties: false,
};
const TIME = {
  type: 'object',
  properties: { zone: { type: 'string' }, format: { anyOf: [{ type: 'string' }, { type: 'null' }] } },
  required: ['zone', 'format'],
  additionalProperties: false,
};
const PERSON = {
  type: 'object',
  properties: {
    name: { type: 'string' },
    age: { type: 'integer', minimum: 0, maximum: 150 },
    email: { type: 'string', format: 'email' },
    pets: { type: 'array', items: { $ref: '#/$defs/pet' } },
  },
  required: ['name', 'age', 'email', 'pets'],
  additionalProperties: false,
  $defs: {
    pet: {
      type: 'object',
      properties: { kind: { type: 'string', enum: ['cat', 'dog'] }, name: { type: 'string' } },
      required: ['kind', 'name'],
      additionalProperties: false,
    },
  },
};

const OPENAI_TOOLS = [
  { type: 'function', function: { name: 'get_weather', description: 'Weather now', parameters: WEATHER, strict: true } },
  { type: 'function', function: { name: 'get_time', description: 'Time now', parameters: TIME, strict: true } },
];
const ANTHROPIC_TOOLS = [
  { name: 'get_weather', description: 'Weather now', input_schema: WEATHER },
  { name: 'get_time', description: 'Time now', input_schema: TIME },
];

// --- The mock server -----------------------------------------------------------

let base = '';

before(async () => {
  if (SKIP) return;
  base = (await startMock(['--port', '0'])).url;
});

after(stopAll);

// Clients of the mock, with directives in the path when given ('a=1,b=2').
const prefix = (dirs) => (dirs ? `/_mock/${dirs}` : '');
const openai = (dirs) => new OpenAI({ baseURL: `${base}${prefix(dirs)}/v1`, apiKey: 'sk-test', maxRetries: 0 });
const anthropic = (dirs) => new Anthropic({ baseURL: `${base}${prefix(dirs)}`, apiKey: 'sk-ant-test', maxRetries: 0 });
const chat = (messages, extra = {}) => ({ model: OPENAI_MODEL, messages, ...extra });
const msgs = (messages, extra = {}) => ({ model: ANTHROPIC_MODEL, max_tokens: 4096, messages, ...extra });
const user = (content) => ({ role: 'user', content });
const CALL_ID = /^call_\w+$/;
const TOOLU_ID = /^toolu_\w+$/;
const LONG = (n) => `${randomUUID()} ` + 'lorem ipsum dolor sit amet '.repeat(n);

// --- OpenAI --------------------------------------------------------------------

function checkOpenAICalls(message, names) {
  assert.equal(message.content, null);
  assert.deepEqual(message.tool_calls.map((c) => c.function.name), names);
  assert.equal(new Set(message.tool_calls.map((c) => c.id)).size, names.length, 'distinct ids');
  for (const c of message.tool_calls) {
    assert.match(c.id, CALL_ID);
    assert.equal(c.type, 'function');
    assertValid(c.function.name === 'get_weather' ? WEATHER : TIME, JSON.parse(c.function.arguments));
  }
}

test('openai: tool calls, plain and through chat.completions.stream().finalChatCompletion()', { skip: SKIP },
  async () => {
    const client = openai();
    const body = chat([user('What is the weather in Paris? Use get_weather.')], { tools: OPENAI_TOOLS });
    const r = await client.chat.completions.create(body);
    assert.equal(r.choices[0].finish_reason, 'tool_calls');
    checkOpenAICalls(r.choices[0].message, ['get_weather']);
    const streamed = await client.chat.completions.stream(body).finalChatCompletion();
    assert.equal(streamed.choices[0].finish_reason, 'tool_calls');
    checkOpenAICalls(streamed.choices[0].message, ['get_weather']);
    assert.equal(streamed.choices[0].message.tool_calls[0].function.arguments,
      r.choices[0].message.tool_calls[0].function.arguments);
    // auto without a tool named: text
    const text = await client.chat.completions.create(chat([user('Hello')], { tools: OPENAI_TOOLS }));
    assert.equal(text.choices[0].finish_reason, 'stop');
    assert.equal(text.choices[0].message.tool_calls, undefined);
  });

test('openai: parallel tool calls, and parallel_tool_calls: false', { skip: SKIP }, async () => {
  const client = openai();
  const body = chat([user('get_time and get_weather, please')], { tools: OPENAI_TOOLS });
  for (const r of [await client.chat.completions.create(body),
    await client.chat.completions.stream(body).finalChatCompletion()]) {
    checkOpenAICalls(r.choices[0].message, ['get_weather', 'get_time']);
  }
  const three = await openai('tool_calls=3').chat.completions.stream(
    chat([user('Hi')], { tools: OPENAI_TOOLS, tool_choice: 'required' })).finalChatCompletion();
  checkOpenAICalls(three.choices[0].message, ['get_weather', 'get_time', 'get_weather']);
  const one = await client.chat.completions.create({ ...body, parallel_tool_calls: false });
  checkOpenAICalls(one.choices[0].message, ['get_weather']);
  const named = await client.chat.completions.create({ ...body,
    tool_choice: { type: 'function', function: { name: 'get_time' } } });
  checkOpenAICalls(named.choices[0].message, ['get_time']);
});

test('openai: runTools runs the tools and gets an answer quoting their results', { skip: SKIP }, async () => {
  for (const stream of [false, true]) {
    const seen = [];
    const runner = openai().chat.completions.runTools({
      ...chat([user('Weather and time in Paris: get_weather and get_time')]),
      stream,
      tools: [
        { type: 'function', function: { name: 'get_weather', description: 'Weather now', parameters: WEATHER,
          parse: JSON.parse, function: (args) => { seen.push(['get_weather', args]); return '22 C, sunny'; } } },
        { type: 'function', function: { name: 'get_time', description: 'Time now', parameters: TIME,
          parse: JSON.parse, function: (args) => { seen.push(['get_time', args]); return { time: '12:00' }; } } },
      ],
    });
    const content = await runner.finalContent();
    assert.deepEqual(seen.map((s) => s[0]), ['get_weather', 'get_time']);
    assertValid(WEATHER, seen[0][1]);
    assertValid(TIME, seen[1][1]);
    const ids = runner.messages.filter((m) => m.role === 'tool').map((m) => m.tool_call_id);
    assert.equal(ids.length, 2);
    assert.ok(content.endsWith(`Tool results: [${ids[0]}] 22 C, sunny; [${ids[1]}] {"time":"12:00"}`), content);
    const final = await runner.finalChatCompletion();
    assert.equal(final.choices[0].finish_reason, 'stop');
  }
});

test('openai: chat.completions.parse with Standard Schema response formats and tools', { skip: SKIP }, async () => {
  const client = openai();
  const person = standardResponseFormat(standardSchema(PERSON), 'person');
  const r = await client.chat.completions.parse(chat([user('Who is it?')], { response_format: person }));
  assertValid(PERSON, r.choices[0].message.parsed);
  assert.deepEqual(r.choices[0].message.parsed, JSON.parse(r.choices[0].message.content));
  const streamed = await client.chat.completions.stream(chat([user('Who is it?')], { response_format: person }))
    .finalChatCompletion();
  assert.deepEqual(streamed.choices[0].message.parsed, r.choices[0].message.parsed);
  // parsed tool arguments
  const tool = standardFunction({ name: 'get_weather', description: 'Weather now',
    parameters: standardSchema(WEATHER) });
  const t = await client.chat.completions.parse(chat([user('get_weather for Oslo')], { tools: [tool] }));
  const call = t.choices[0].message.tool_calls[0];
  assert.equal(call.function.name, 'get_weather');
  assertValid(WEATHER, call.function.parsed_arguments);
  // json_object mode
  const j = await client.chat.completions.create(chat([user('Answer in JSON: hi')],
    { response_format: { type: 'json_object' } }));
  assert.match(JSON.parse(j.choices[0].message.content).answer, /^Hello from the mock openai provider/);
});

test('openai: images and files are seen', { skip: SKIP }, async () => {
  const r = await openai().chat.completions.create(chat([user([
    { type: 'text', text: 'What is in these?' },
    { type: 'image_url', image_url: { url: `data:image/png;base64,${PNG}`, detail: 'low' } },
    { type: 'image_url', image_url: { url: 'https://example.com/cat.jpg' } },
    { type: 'file', file: { file_data: `data:application/pdf;base64,${PDF}`, filename: 'a.pdf' } },
  ])]));
  assert.ok(r.choices[0].message.content.endsWith('I see 2 images and 1 document.'), r.choices[0].message.content);
});

test('openai: a long prefix seen again reports cached tokens', { skip: SKIP }, async () => {
  const client = openai();
  const body = chat([{ role: 'system', content: LONG(240) }, user('first')]);
  const first = await client.chat.completions.create(body);
  assert.equal(first.usage.prompt_tokens_details.cached_tokens, 0);
  const second = await client.chat.completions.stream({ ...body, stream_options: { include_usage: true } })
    .finalChatCompletion();
  assert.ok(second.usage.prompt_tokens_details.cached_tokens >= 1024, JSON.stringify(second.usage));
  assert.equal(second.usage.prompt_tokens_details.cached_tokens % 128, 0);
  assert.equal(second.usage.completion_tokens_details.reasoning_tokens, 0);
});

test('openai: stop sequences, n, logprobs, reasoning', { skip: SKIP }, async () => {
  const client = openai('text=one%20two%20three%20four');
  const stop = await client.chat.completions.create(chat([user('count')], { stop: ['three'] }));
  assert.equal(stop.choices[0].message.content, 'one two ');
  assert.equal(stop.choices[0].finish_reason, 'stop');

  const n = await openai().chat.completions.create(chat([user('Pick')], { n: 2 }));
  assert.deepEqual(n.choices.map((c) => c.index), [0, 1]);
  assert.equal(n.choices[1].message.content, `${n.choices[0].message.content} (choice 1)`);
  const ns = await openai().chat.completions.stream(chat([user('Pick')], { n: 2 })).finalChatCompletion();
  assert.deepEqual(ns.choices.map((c) => c.message.content), n.choices.map((c) => c.message.content));

  for (const r of [
    await openai().chat.completions.create(chat([user('hi')], { logprobs: true, top_logprobs: 2 })),
    await openai().chat.completions.stream(chat([user('hi')], { logprobs: true, top_logprobs: 2 }))
      .finalChatCompletion(),
  ]) {
    const c = r.choices[0];
    assert.equal(c.logprobs.content.map((t) => t.token).join(''), c.message.content);
    for (const t of c.logprobs.content) {
      assert.ok(t.logprob < 0);
      assert.equal(t.top_logprobs.length, 2);
      assert.equal(Buffer.from(t.bytes).toString(), t.token);
    }
  }

  const reasoning = await openai().chat.completions.create(chat([user('hi')], { reasoning_effort: 'high' }));
  assert.ok(reasoning.usage.completion_tokens_details.reasoning_tokens > 0);
  assert.equal(reasoning.service_tier, 'default');
  assert.match(reasoning.system_fingerprint, /^fp_/);
  let thought = '';
  let text = '';
  for await (const chunk of await openai('reasoning_content=1').chat.completions.create(
    chat([user('Why?')], { stream: true }))) {
    const d = chunk.choices[0]?.delta ?? {};
    if (d.reasoning_content) {
      assert.equal(text, '', 'reasoning comes first');
      thought += d.reasoning_content;
    }
    text += d.content ?? '';
  }
  assert.match(thought, /^The user asks: "Why\?"/);
  assert.match(text, /^Hello from the mock openai provider/);
});

test('openai: what the API refuses is a BadRequestError with its param', { skip: SKIP }, async () => {
  await assert.rejects(openai().chat.completions.create(chat([user('hi'),
    { role: 'tool', tool_call_id: 'call_x', content: '1' }])), (err) => {
    assert.ok(err instanceof OpenAI.BadRequestError, `${err.constructor.name} ${err.status}`);
    assert.equal(err.status, 400);
    assert.equal(err.type, 'invalid_request_error');
    assert.equal(err.param, 'messages.[1].role');
    assert.match(err.message, /must be a response to a preceeding message with 'tool_calls'/);
    return true;
  });
});

// --- Anthropic -----------------------------------------------------------------

function checkToolUses(message, names) {
  const uses = message.content.filter((b) => b.type === 'tool_use');
  assert.deepEqual(uses.map((b) => b.name), names);
  assert.equal(new Set(uses.map((b) => b.id)).size, names.length, 'distinct ids');
  for (const b of uses) {
    assert.match(b.id, TOOLU_ID);
    assertValid(b.name === 'get_weather' ? WEATHER : TIME, b.input);
  }
  assert.equal(message.stop_reason, 'tool_use');
}

test('anthropic: tool use, plain and through messages.stream().finalMessage()', { skip: SKIP }, async () => {
  const client = anthropic();
  const body = msgs([user('What is the weather in Paris? Use get_weather.')], { tools: ANTHROPIC_TOOLS });
  const r = await client.messages.create(body);
  checkToolUses(r, ['get_weather']);
  const streamed = await client.messages.stream(body).finalMessage();
  checkToolUses(streamed, ['get_weather']);
  assert.deepEqual(streamed.content[0].input, r.content[0].input);
  const both = msgs([user('get_time and get_weather')], { tools: ANTHROPIC_TOOLS });
  checkToolUses(await client.messages.create(both), ['get_weather', 'get_time']);
  checkToolUses(await client.messages.stream(both).finalMessage(), ['get_weather', 'get_time']);
  checkToolUses(await client.messages.create({ ...both,
    tool_choice: { type: 'auto', disable_parallel_tool_use: true } }), ['get_weather']);
  checkToolUses(await client.messages.create({ ...both, tool_choice: { type: 'tool', name: 'get_time' } }),
    ['get_time']);
});

test('anthropic: the beta tool runner runs the tool and gets an answer quoting its result', { skip: SKIP },
  async () => {
    const seen = [];
    const weather = betaTool({ name: 'get_weather', description: 'Weather now', inputSchema: WEATHER,
      run: (args) => { seen.push(args); return '22 C, sunny'; } });
    const final = await anthropic().beta.messages.toolRunner(
      msgs([user('Weather in Paris? get_weather please')], { tools: [weather] }));
    assert.equal(seen.length, 1);
    assertValid(WEATHER, seen[0]);
    assert.equal(final.stop_reason, 'end_turn');
    assert.match(final.content[0].text, /Tool results: \[toolu_\w+\] 22 C, sunny$/);
  });

test('anthropic: messages.parse with a JSON Schema output format, plain and streamed', { skip: SKIP },
  async () => {
    const client = anthropic();
    const body = msgs([user('Who is it?')], { output_config: { format: jsonSchemaOutputFormat(PERSON) } });
    const r = await client.messages.parse(body);
    assertValid(PERSON, r.parsed_output);
    const streamed = await client.messages.stream(body).finalMessage();
    assert.deepEqual(streamed.parsed_output, r.parsed_output);
    // the beta API and a Standard Schema: the SDK validates
    const beta = await client.beta.messages.parse(msgs([user('Who is it?')],
      { output_format: betaStandardSchemaOutputFormat(standardSchema(PERSON)) }));
    assert.deepEqual(beta.parsed_output, r.parsed_output);
  });

test('anthropic: thinking round trip: the SDK\'s final message goes back and is verified', { skip: SKIP },
  async () => {
    const client = anthropic('redacted_thinking=1');
    const thinking = { type: 'enabled', budget_tokens: 1024 };
    for (const first of [
      await client.messages.create(msgs([user('Why is the sky blue?')], { thinking })),
      await client.messages.stream(msgs([user('Why is the sky blue?')], { thinking })).finalMessage(),
    ]) {
      assert.deepEqual(first.content.map((b) => b.type), ['thinking', 'redacted_thinking', 'text']);
      assert.match(first.content[0].thinking, /^The user asks: "Why is the sky blue\?"/);
      assert.match(first.content[0].signature, /^[A-Za-z0-9+/]+=*$/);
      const next = msgs([user('Why is the sky blue?'), { role: 'assistant', content: first.content },
        user('And at sunset?')], { thinking });
      const { data, response } = await client.messages.create(next).withResponse();
      assert.equal(response.headers.get('x-mock-thinking-verified'), 'true');
      assert.equal(data.content[0].type, 'thinking');
      // a block changed under its signature
      const forged = structuredClone(next);
      forged.messages[1].content[0].thinking += ' Or not.';
      await assert.rejects(client.messages.create(forged), (err) => {
        assert.ok(err instanceof Anthropic.BadRequestError, `${err.constructor.name} ${err.status}`);
        assert.equal(err.error?.error?.type, 'invalid_request_error');
        assert.match(err.error.error.message, /Invalid `signature` in `thinking` block/);
        return true;
      });
    }
    // thinking with a tool: the tool-use turn goes back with its thinking
    const tools = ANTHROPIC_TOOLS;
    const first = await anthropic().messages.stream(msgs([user('use get_time')], { thinking, tools })).finalMessage();
    assert.deepEqual(first.content.map((b) => b.type), ['thinking', 'tool_use']);
    const { data, response } = await anthropic().messages.create(msgs([user('use get_time'),
      { role: 'assistant', content: first.content },
      user([{ type: 'tool_result', tool_use_id: first.content[1].id, content: '12:00' }])],
    { thinking, tools })).withResponse();
    assert.equal(response.headers.get('x-mock-thinking-verified'), 'true');
    assert.match(data.content[1].text, /Tool results: \[toolu_\w+\] 12:00$/);
  });

test('anthropic: images and documents are seen', { skip: SKIP }, async () => {
  const r = await anthropic().messages.create(msgs([user([
    { type: 'image', source: { type: 'base64', media_type: 'image/png', data: PNG } },
    { type: 'image', source: { type: 'url', url: 'https://example.com/cat.jpg' } },
    { type: 'document', source: { type: 'base64', media_type: 'application/pdf', data: PDF } },
    { type: 'text', text: 'Compare them' },
  ])]));
  assert.ok(r.content[0].text.endsWith('I see 2 images and 1 document.'), r.content[0].text);
});

test('anthropic: prompt caching writes, then reads, in create and in stream', { skip: SKIP }, async () => {
  const client = anthropic();
  const system = [{ type: 'text', text: LONG(200), cache_control: { type: 'ephemeral' } }];
  const first = await client.messages.create(msgs([user('Summarise')], { system }));
  assert.ok(first.usage.cache_creation_input_tokens >= 1000, JSON.stringify(first.usage));
  assert.equal(first.usage.cache_read_input_tokens, 0);
  assert.equal(first.usage.cache_creation.ephemeral_5m_input_tokens, first.usage.cache_creation_input_tokens);
  const second = await client.messages.stream(msgs([user('Summarise')], { system })).finalMessage();
  assert.equal(second.usage.cache_read_input_tokens, first.usage.cache_creation_input_tokens);
  assert.equal(second.usage.cache_creation_input_tokens, 0);
  assert.equal(second.usage.input_tokens, first.usage.input_tokens);
});

test('anthropic: stop sequences and prefill', { skip: SKIP }, async () => {
  const client = anthropic('text=The%20best%20answer%20is%20(B)%20Helios.%20Next');
  const body = msgs([user('Greek name for the Sun? (A) Sol (B) Helios'),
    { role: 'assistant', content: 'The best answer is (' }], { stop_sequences: ['. '] });
  for (const r of [await client.messages.create(body), await client.messages.stream(body).finalMessage()]) {
    assert.equal(r.content[0].text, 'B) Helios');
    assert.equal(r.stop_reason, 'stop_sequence');
    assert.equal(r.stop_sequence, '. ');
  }
});

test('anthropic: what the API refuses is a BadRequestError in its shape', { skip: SKIP }, async () => {
  await assert.rejects(anthropic().messages.create(msgs([{ role: 'system', content: 'Be terse.' }, user('hi')])),
    (err) => {
      assert.ok(err instanceof Anthropic.BadRequestError, `${err.constructor.name} ${err.status}`);
      assert.equal(err.error?.type, 'error');
      assert.equal(err.error.error.type, 'invalid_request_error');
      assert.match(err.error.error.message, /^messages\.0\.role: Unexpected role "system"/);
      return true;
    });
  await assert.rejects(anthropic().messages.create(msgs([user('hi'),
    user([{ type: 'tool_result', tool_use_id: 'toolu_x', content: '1' }])])), Anthropic.BadRequestError);
});
