// The official clients of the OpenAI-compatible presets, unchanged (only
// their base URL and key set), against the mock's servers of them
// (scripts/aiorch/mock/compat.lua, served by tests/mock_server.lua):
// openai's AzureOpenAI on Azure's deployment path (api-key, api-version),
// groq-sdk on Groq's /openai/v1, @mistralai/mistralai on Mistral's
// /v1/chat/completions, and the openai client on Ollama's OpenAI-compatible
// /v1 (the ollama preset's endpoint; the `ollama` package speaks Ollama's
// native /api/chat, which the preset does not use and the mock does not
// serve). Plain and streamed, tool calls included, errors as each SDK's
// classes. Then the OpenAI and Anthropic clients through `aiorch serve` to
// azure, groq, mistral and a provider declared by configuration alone.
//   node --test tests/sdk/compat.test.mjs     (from the repository root; CTest: sdk_clients)
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import OpenAI, { AzureOpenAI } from 'openai';
import Anthropic from '@anthropic-ai/sdk';
import Groq from 'groq-sdk';
import { Mistral } from '@mistralai/mistralai';
import * as mistralErrors from '@mistralai/mistralai/models/errors';
import { AIORCH, hasServe, startMock, startServe, stopAll } from './support.mjs';

const KEY = 'compat-sdk-key';

const SKIP = hasServe() ? false : `${AIORCH} is not built (or has no 'serve' command)`;

const WEATHER = {
  type: 'object',
  properties: { city: { type: 'string' } },
  required: ['city'],
};
const TOOLS = [{ type: 'function', function: { name: 'get_weather', description: 'Weather now', parameters: WEATHER } }];
const ASK_TOOL = [{ role: 'user', content: 'Weather in Oslo? get_weather' }];

let tmp;

async function startGateway(mock) {
  const config = join(tmp, 'gateway.lua');
  writeFileSync(config, `return { providers = {
  azure = { base_url = "${mock}/azure", deployments = { ["gpt-4o"] = "prod-4o" }, api_version = "2024-10-21" },
  groq = { base_url = "${mock}/groq/openai/v1" },
  mistral = { base_url = "${mock}/mistral/v1" },
  mylocal = { api = "openai", base_url = "${mock}/ollama/v1", api_key_env = false, models = { "llama3.1:8b" } },
} }\n`);
  const { url } = await startServe(['--workers', '0', '--config', config],
    { AZURE_OPENAI_API_KEY: KEY, GROQ_API_KEY: KEY, MISTRAL_API_KEY: KEY, OPENAI_API_KEY: '', ANTHROPIC_API_KEY: '',
      OPENAI_API_VERSION: '' });
  return url;
}

let mock = '';
let gateway = '';

before(async () => {
  if (SKIP) return;
  tmp = mkdtempSync(join(tmpdir(), 'aiorch-compat-sdk-'));
  mock = (await startMock(['--port', '0', '--chunks', '3'])).url;
  gateway = await startGateway(mock);
});

after(async () => {
  await stopAll();
  if (tmp) rmSync(tmp, { recursive: true, force: true });
});

// A stream's text, tool calls ({id, name, args}), finish reason and usage, from OpenAI-shaped chunks.
async function collect(stream) {
  let text = '';
  let finish = null;
  let usage = null;
  const calls = [];
  for await (const chunk of stream) {
    usage = chunk.usage ?? chunk.x_groq?.usage ?? usage;
    for (const c of chunk.choices ?? []) {
      text += c.delta?.content ?? '';
      for (const tc of c.delta?.tool_calls ?? c.delta?.toolCalls ?? []) {
        const i = tc.index ?? 0;
        calls[i] ??= { id: '', name: '', args: '' };
        calls[i].id ||= tc.id ?? '';
        calls[i].name ||= tc.function?.name ?? '';
        const a = tc.function?.arguments;
        calls[i].args += typeof a === 'string' ? a : a ? JSON.stringify(a) : '';
      }
      finish = c.finish_reason ?? c.finishReason ?? finish;
    }
  }
  return { text, calls, finish, usage };
}

test('AzureOpenAI against the mock deployment: chat, stream, tools, errors', { skip: SKIP }, async () => {
  const client = new AzureOpenAI({ endpoint: `${mock}/azure`, apiKey: KEY, apiVersion: '2024-10-21',
    deployment: 'dep-4o', maxRetries: 0 });
  const r = await client.chat.completions.create({ model: 'gpt-4o', messages: [{ role: 'user', content: 'Hi Azure' }] });
  assert.match(r.choices[0].message.content, /You asked: Hi Azure/);
  assert.equal(r.model, 'gpt-4o');
  assert.ok(r.usage.total_tokens > 0);
  const s = await collect(await client.chat.completions.create({ model: 'gpt-4o', stream: true,
    stream_options: { include_usage: true }, messages: ASK_TOOL, tools: TOOLS }));
  assert.equal(s.finish, 'tool_calls');
  assert.equal(s.calls[0].name, 'get_weather');
  assert.equal(typeof JSON.parse(s.calls[0].args).city, 'string');
  assert.ok(s.usage.completion_tokens > 0);
  const bad = new AzureOpenAI({ endpoint: `${mock}/azure`, apiKey: KEY, apiVersion: '1999-01-01', deployment: 'd',
    maxRetries: 0 });
  await assert.rejects(bad.chat.completions.create({ model: 'x', messages: [{ role: 'user', content: 'hi' }] }),
    (e) => e instanceof OpenAI.BadRequestError && /API version not supported/.test(e.message));
  const missing = new AzureOpenAI({ endpoint: `${mock}/azure`, apiKey: KEY, apiVersion: '2024-10-21',
    deployment: 'missing-4o', maxRetries: 0 });
  await assert.rejects(missing.chat.completions.create({ model: 'x', messages: [{ role: 'user', content: 'hi' }] }),
    (e) => e instanceof OpenAI.NotFoundError && e.code === 'DeploymentNotFound');
  const nokey = new OpenAI({ baseURL: `${mock}/azure/openai/deployments/d`, apiKey: KEY, maxRetries: 0,
    defaultQuery: { 'api-version': '2024-10-21' } });
  await assert.rejects(nokey.chat.completions.create({ model: 'x', messages: [{ role: 'user', content: 'hi' }] }),
    (e) => e instanceof OpenAI.AuthenticationError);
});

test('groq-sdk against the mock: chat, stream with x_groq usage, tools, refused fields', { skip: SKIP }, async () => {
  const groq = new Groq({ baseURL: `${mock}/groq`, apiKey: KEY, maxRetries: 0 });
  const r = await groq.chat.completions.create({ model: 'llama-3.3-70b-versatile',
    messages: [{ role: 'user', content: 'Hi Groq' }] });
  assert.match(r.choices[0].message.content, /You asked: Hi Groq/);
  const t = await groq.chat.completions.create({ model: 'llama-3.3-70b-versatile', messages: ASK_TOOL, tools: TOOLS,
    tool_choice: 'required' });
  assert.equal(t.choices[0].finish_reason, 'tool_calls');
  assert.equal(t.choices[0].message.tool_calls[0].function.name, 'get_weather');
  const s = await collect(await groq.chat.completions.create({ model: 'llama-3.3-70b-versatile', stream: true,
    messages: [{ role: 'user', content: 'Stream, Groq' }] }));
  assert.match(s.text, /You asked: Stream, Groq/);
  assert.equal(s.finish, 'stop');
  assert.ok(s.usage.completion_tokens > 0, 'x_groq.usage');
  const st = await collect(await groq.chat.completions.create({ model: 'llama-3.3-70b-versatile', stream: true,
    messages: ASK_TOOL, tools: TOOLS }));
  assert.equal(st.finish, 'tool_calls');
  assert.equal(typeof JSON.parse(st.calls[0].args).city, 'string');
  await assert.rejects(groq.chat.completions.create({ model: 'x', stream: true, stream_options: { include_usage: true },
    messages: [{ role: 'user', content: 'hi' }] }), (e) => e instanceof Groq.BadRequestError);
  await assert.rejects(new Groq({ baseURL: `${mock}/groq`, apiKey: '', maxRetries: 0 }).chat.completions.create({
    model: 'x', messages: [{ role: 'user', content: 'hi' }] }), (e) => e instanceof Groq.AuthenticationError);
});

test('@mistralai/mistralai against the mock: chat, stream, tools with 9-character ids, errors', { skip: SKIP },
  async () => {
    const client = new Mistral({ serverURL: `${mock}/mistral`, apiKey: KEY });
    const r = await client.chat.complete({ model: 'mistral-small-latest', randomSeed: 3, maxTokens: 50,
      messages: [{ role: 'user', content: 'Hi Mistral' }] });
    assert.match(r.choices[0].message.content, /You asked: Hi Mistral/);
    assert.ok(r.usage.totalTokens > 0);
    const t = await client.chat.complete({ model: 'mistral-small-latest', messages: ASK_TOOL, tools: TOOLS,
      toolChoice: 'any' });
    const call = t.choices[0].message.toolCalls[0];
    assert.match(call.id, /^[A-Za-z0-9]{9}$/);
    assert.equal(t.choices[0].finishReason, 'tool_calls');
    // the call answered, under its own id: the mock checks the pair
    const back = await client.chat.complete({ model: 'mistral-small-latest', tools: TOOLS, messages: [...ASK_TOOL,
      { role: 'assistant', content: '', toolCalls: [call] },
      { role: 'tool', toolCallId: call.id, name: 'get_weather', content: '5 C' }] });
    assert.match(back.choices[0].message.content, /5 C/);
    const s = await collect(await client.chat.stream({ model: 'mistral-small-latest', messages: ASK_TOOL,
      tools: TOOLS }).then(async function* (it) { for await (const ev of it) yield ev.data; }));
    assert.equal(s.finish, 'tool_calls');
    assert.match(s.calls[0].id, /^[A-Za-z0-9]{9}$/);
    assert.ok(s.usage.completionTokens > 0);
    await assert.rejects(client.chat.complete({ model: 'x', tools: TOOLS, messages: [...ASK_TOOL,
      { role: 'assistant', content: '', toolCalls: [{ id: 'call_not_nine', function: { name: 'get_weather',
        arguments: '{}' } }] }, { role: 'tool', toolCallId: 'call_not_nine', content: '5 C' }] }),
    (e) => e instanceof mistralErrors.MistralError && e.statusCode === 400 && /length of 9/.test(e.body));
    await assert.rejects(new Mistral({ serverURL: `${mock}/mistral`, apiKey: '' }).chat.complete({ model: 'x',
      messages: [{ role: 'user', content: 'hi' }] }), (e) => e instanceof mistralErrors.MistralError
      && e.statusCode === 401);
  });

test('the openai client on the mock Ollama /v1 (the ollama preset): chat, stream, tools', { skip: SKIP }, async () => {
  const client = new OpenAI({ baseURL: `${mock}/ollama/v1`, apiKey: 'ollama', maxRetries: 0 });
  const r = await client.chat.completions.create({ model: 'llama3.1:8b', max_tokens: 30,
    messages: [{ role: 'user', content: 'Hi Ollama' }] });
  assert.match(r.choices[0].message.content, /You asked: Hi Ollama/);
  const s = await collect(await client.chat.completions.create({ model: 'llama3.1:8b', stream: true,
    stream_options: { include_usage: true }, messages: ASK_TOOL, tools: TOOLS }));
  assert.equal(s.finish, 'tool_calls');
  assert.equal(typeof JSON.parse(s.calls[0].args).city, 'string');
  assert.ok(s.usage.prompt_tokens > 0);
});

for (const [model, provider] of [['gpt-4o', 'azure'], ['llama-3.3-70b-versatile', 'groq'],
  ['mistral-small-latest', 'mistral'], ['llama3.1:8b', 'mylocal']]) {
  test(`aiorch serve: the OpenAI client streams ${provider}'s tool calls`, { skip: SKIP }, async () => {
    const client = new OpenAI({ baseURL: `${gateway}/v1`, apiKey: 'unused', maxRetries: 0 });
    const { data: stream, response } = await client.chat.completions.create({ model, stream: true,
      stream_options: { include_usage: true }, messages: ASK_TOOL, tools: TOOLS }).withResponse();
    assert.equal(response.headers.get('x-aiorch-provider'), provider);
    const s = await collect(stream);
    assert.equal(s.finish, 'tool_calls');
    assert.equal(s.calls[0].name, 'get_weather');
    assert.equal(typeof JSON.parse(s.calls[0].args).city, 'string');
    if (provider === 'mistral') assert.match(s.calls[0].id, /^[A-Za-z0-9]{9}$/);
  });

  test(`aiorch serve: the Anthropic client streams ${provider}'s tool_use`, { skip: SKIP }, async () => {
    const client = new Anthropic({ baseURL: gateway, apiKey: 'unused', maxRetries: 0 });
    const stream = client.messages.stream({ model, max_tokens: 200, messages: ASK_TOOL,
      tools: [{ name: 'get_weather', description: 'Weather now', input_schema: WEATHER }] });
    let json = '';
    stream.on('inputJson', (delta) => { json += delta; });
    const msg = await stream.finalMessage();
    assert.equal(msg.stop_reason, 'tool_use');
    const use = msg.content.find((b) => b.type === 'tool_use');
    assert.equal(use.name, 'get_weather');
    assert.equal(typeof use.input.city, 'string');
    assert.equal(JSON.parse(json).city, use.input.city);
  });
}
