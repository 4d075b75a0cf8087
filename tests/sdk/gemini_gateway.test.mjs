// The Gemini API of `aiorch serve`, through the official clients, unchanged
// (only the base URL and key set), with the mock providers behind it:
// Google's @google/genai against every provider (a gemini provider gets
// the client's bytes; openai and anthropic are translated), and the OpenAI
// and Anthropic clients against the gemini provider; plain and streamed,
// function calling and thinking included.
//   node --test tests/sdk/gemini_gateway.test.mjs     (from the repository root; CTest: sdk_clients)
// AIORCH_BUILD names the build directory (default: build).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { GoogleGenAI, ApiError, createPartFromFunctionResponse, createUserContent, createModelContent }
  from '@google/genai';
import OpenAI from 'openai';
import Anthropic from '@anthropic-ai/sdk';
import { AIORCH, HOST, collectGemini, hasServe, mockPrefix, startMock, startServe, stopAll } from './support.mjs';

const MODEL = 'gemini-2.5-flash';
const QUESTION = 'What is the capital of France?';

const SKIP = hasServe() ? false : `${AIORCH} has no 'serve' command yet`;

const WEATHER = {
  type: 'object',
  properties: { city: { type: 'string' }, days: { type: 'integer', minimum: 1, maximum: 7 } },
  required: ['city', 'days'],
  additionalProperties: false,
};
const PERSON = {
  type: 'object',
  properties: { name: { type: 'string' }, age: { type: 'integer' } },
  required: ['name', 'age'],
  additionalProperties: false,
};

// `aiorch serve` with the three providers on the mock (directives in the
// base URLs' path when given); waits until /healthz answers.
async function startGateway(mockPort, directives = '') {
  const mock = `http://${HOST}:${mockPort}${mockPrefix(directives)}`;
  const { url } = await startServe(['--workers', '0'], {
    AIORCH_PROVIDERS: 'openai,anthropic,gemini',
    OPENAI_API_KEY: 'sk-test-openai', ANTHROPIC_API_KEY: 'sk-ant-test-anthropic', GEMINI_API_KEY: 'gm-test-gemini',
    OPENAI_BASE_URL: `${mock}/v1`, ANTHROPIC_BASE_URL: mock, GEMINI_BASE_URL: mock,
  });
  return url;
}

let gw;
let limited;
let cut;

before(async () => {
  if (SKIP) return;
  const { port: mockPort } = await startMock();
  [gw, limited, cut] = await Promise.all([startGateway(mockPort), startGateway(mockPort, 'fault=429,retry_after=1'),
    startGateway(mockPort, 'fault=cut,chunks=6')]);
});

after(stopAll);

// A Gemini client of a gateway; provider: the X-Aiorch-Providers header.
const gemini = (url, provider) => new GoogleGenAI({ apiKey: 'gm-client', httpOptions: {
  baseUrl: url, ...(provider ? { headers: { 'X-Aiorch-Providers': provider } } : {}) } });
const ask = (contents, config = {}) => ({ model: MODEL, contents, config });

const collect = collectGemini;

// A CallableTool for the SDK's automatic function calling.
function weatherTool(seen) {
  return {
    tool: async () => ({ functionDeclarations: [{ name: 'get_weather', description: 'Weather now',
      parametersJsonSchema: WEATHER }] }),
    callTool: async (calls) => calls.map((c) => {
      seen.push(c);
      return createPartFromFunctionResponse(c.id ?? '', c.name, { output: '22 C, sunny' });
    }),
  };
}

// --- @google/genai against each provider -----------------------------------

test('gemini client, gemini provider: the answer is the provider\'s own, plain and streamed', { skip: SKIP },
  async () => {
    const client = gemini(gw);
    const r = await client.models.generateContent(ask(QUESTION));
    assert.equal(r.sdkHttpResponse.headers['x-aiorch-provider'], 'gemini');
    assert.equal(r.text, `Hello from the mock gemini provider. You asked: ${QUESTION}`);
    assert.match(r.responseId, /^mock-gemini-/); // relayed as it came, not written by the gateway
    assert.deepEqual(r.usageMetadata.promptTokensDetails, [{ modality: 'TEXT', tokenCount: 6 }]);
    const { chunks, text, last } = await collect(await client.models.generateContentStream(ask(QUESTION)));
    assert.ok(chunks.length >= 3);
    assert.equal(text, r.text);
    assert.equal(last.candidates[0].finishReason, 'STOP');
    assert.match(last.responseId, /^mock-gemini-/);
  });

test('gemini client, gemini provider: fields of its own API pass (a last model turn); another API refuses them',
  { skip: SKIP }, async () => {
    const contents = [createUserContent('Greek name for the Sun?'), createModelContent('The answer is')];
    const r = await gemini(gw).models.generateContent(ask(contents));
    assert.equal(r.sdkHttpResponse.headers['x-aiorch-provider'], 'gemini');
    await assert.rejects(gemini(gw, 'openai').models.generateContent(ask(contents)), (err) => {
      assert.ok(err instanceof ApiError, String(err));
      assert.equal(err.status, 400);
      const e = JSON.parse(err.message).error;
      assert.equal(e.status, 'INVALID_ARGUMENT');
      assert.match(e.message, /^prefill is not supported by provider openai/);
      return true;
    });
  });

test('gemini client, gemini provider: automatic function calling and a thinking chat', { skip: SKIP },
  async () => {
    const seen = [];
    const r = await gemini(gw).models.generateContent(ask('Weather in Paris? use get_weather',
      { tools: [weatherTool(seen)] }));
    assert.equal(seen.length, 1);
    assert.equal(typeof seen[0].args.city, 'string');
    assert.match(r.text, /Tool results: \[get_weather\] 22 C, sunny$/);

    const chat = gemini(gw).chats.create({ model: MODEL,
      config: { thinkingConfig: { includeThoughts: true, thinkingBudget: 1024 } } });
    const first = await collect(await chat.sendMessageStream({ message: 'Why is the sky blue?' }));
    assert.ok(first.chunks.some((c) => c.candidates[0].content.parts.some((p) => p.thought && p.thoughtSignature)));
    const next = await chat.sendMessage({ message: 'And at sunset?' }); // the mock verifies the signatures
    assert.match(next.text, /You asked: And at sunset\?$/);
    const forged = chat.getHistory();
    forged.find((c) => c.role === 'model').parts[0].text = 'Something else';
    await assert.rejects(gemini(gw).models.generateContent(ask([...forged, createUserContent('Hm?')],
      { thinkingConfig: { includeThoughts: true, thinkingBudget: 1024 } })), (err) => {
      assert.ok(err instanceof ApiError);
      assert.match(err.message, /Corrupted thought signature/);
      return true;
    });
  });

for (const provider of ['openai', 'anthropic']) {
  test(`gemini client, ${provider} provider: translated, plain and streamed, function calls and JSON`,
    { skip: SKIP }, async () => {
      const client = gemini(gw, provider);
      const r = await client.models.generateContent(ask(QUESTION));
      assert.equal(r.sdkHttpResponse.headers['x-aiorch-provider'], provider);
      assert.equal(r.text, `Hello from the mock ${provider} provider. You asked: ${QUESTION}`);
      assert.equal(r.candidates[0].finishReason, 'STOP');
      assert.ok(r.usageMetadata.promptTokenCount > 0 && r.usageMetadata.candidatesTokenCount > 0);
      const { chunks, text, last } = await collect(await client.models.generateContentStream(ask(QUESTION)));
      assert.ok(chunks.length >= 3, `${chunks.length} chunks`);
      assert.equal(text, r.text);
      assert.equal(last.candidates[0].finishReason, 'STOP');
      assert.ok(last.usageMetadata.candidatesTokenCount > 0);

      // function calls: the provider's ids come as functionCall ids and go back
      for (const stream of [false, true]) {
        const seen = [];
        const params = ask('Weather in Paris? use get_weather', { tools: [weatherTool(seen)] });
        const out = stream ? (await collect(await client.models.generateContentStream(params))).text
          : (await client.models.generateContent(params)).text;
        assert.equal(seen.length, 1);
        assert.ok(seen[0].id, 'the call has an id');
        assert.equal(typeof seen[0].args.city, 'string');
        assert.ok(out.endsWith(`Tool results: [${seen[0].id}] 22 C, sunny`), out);
      }
      const json = await client.models.generateContent(ask('Who is it?',
        { responseMimeType: 'application/json', responseJsonSchema: PERSON }));
      const person = JSON.parse(json.text);
      assert.equal(typeof person.name, 'string');
      assert.ok(Number.isInteger(person.age));
    });
}

test('gemini client: rate limits and cut streams are ApiErrors', { skip: SKIP }, async () => {
  for (const provider of ['gemini', 'openai']) {
    await assert.rejects(gemini(limited, provider).models.generateContent(ask(QUESTION)), (err) => {
      assert.ok(err instanceof ApiError, String(err));
      assert.equal(err.status, 429);
      assert.equal(JSON.parse(err.message).error.status, 'RESOURCE_EXHAUSTED');
      return true;
    });
    let text = '';
    await assert.rejects((async () => {
      for await (const c of await gemini(cut, provider).models.generateContentStream(ask(QUESTION))) {
        text += c.text ?? '';
      }
    })(), (err) => {
      assert.ok(err instanceof ApiError, `${provider}: ${err}`);
      assert.ok(err.status >= 500, String(err.status));
      return true;
    });
    assert.ok(text.length > 0, `${provider}: some text came before the error`);
  }
});

test('gemini client: models.list', { skip: SKIP }, async () => {
  const names = [];
  for await (const m of await gemini(gw).models.list()) names.push(m.name);
  assert.ok(names.includes(`models/${MODEL}`), names.join(','));
});

// --- OpenAI and Anthropic clients against the gemini provider ------------------

test('openai client, gemini provider: text, streamed tool-call deltas, runTools', { skip: SKIP }, async () => {
  const client = new OpenAI({ baseURL: `${gw}/v1`, apiKey: 'sk-dummy' });
  const body = { model: MODEL, messages: [{ role: 'user', content: QUESTION }] };
  const { data, response } = await client.chat.completions.create(body).withResponse();
  assert.equal(response.headers.get('x-aiorch-provider'), 'gemini');
  assert.equal(data.choices[0].message.content, `Hello from the mock gemini provider. You asked: ${QUESTION}`);
  assert.equal(data.choices[0].finish_reason, 'stop');

  const tools = [{ type: 'function', function: { name: 'get_weather', parameters: WEATHER } }];
  const ids = new Set();
  let args = '';
  let finish = null;
  for await (const chunk of await client.chat.completions.create({ ...body, stream: true, tools,
    messages: [{ role: 'user', content: 'Weather in Paris? use get_weather' }] })) {
    const c = chunk.choices[0];
    for (const tc of c?.delta?.tool_calls ?? []) {
      if (tc.id) ids.add(tc.id);
      args += tc.function?.arguments ?? '';
    }
    if (c?.finish_reason) finish = c.finish_reason;
  }
  assert.equal(ids.size, 1);
  assert.match([...ids][0], /^gcall_/);
  assert.equal(typeof JSON.parse(args).city, 'string');
  assert.equal(finish, 'tool_calls');

  for (const stream of [false, true]) {
    const seen = [];
    const runner = client.chat.completions.runTools({ model: MODEL, stream,
      messages: [{ role: 'user', content: 'Weather in Paris? use get_weather' }],
      tools: [{ type: 'function', function: { name: 'get_weather', parameters: WEATHER, parse: JSON.parse,
        function: (a) => { seen.push(a); return '22 C, sunny'; } } }] });
    const content = await runner.finalContent();
    assert.equal(seen.length, 1);
    // Gemini pairs the result with its call by name: the mock quotes the name.
    assert.ok(content.endsWith('Tool results: [get_weather] 22 C, sunny'), content);
  }
});

test('anthropic client, gemini provider: streamed tool use, and a thinking round trip', { skip: SKIP },
  async () => {
    const client = new Anthropic({ baseURL: gw, apiKey: 'sk-ant-dummy' });
    const tools = [{ name: 'get_weather', description: 'Weather now', input_schema: WEATHER }];
    const msg = await client.messages.stream({ model: MODEL, max_tokens: 512, tools,
      messages: [{ role: 'user', content: 'Weather in Paris? use get_weather' }] }).finalMessage();
    assert.equal(msg.stop_reason, 'tool_use');
    const use = msg.content.find((b) => b.type === 'tool_use');
    assert.equal(use.name, 'get_weather');
    assert.equal(typeof use.input.city, 'string');
    const answer = await client.messages.create({ model: MODEL, max_tokens: 512, tools, messages: [
      { role: 'user', content: 'Weather in Paris? use get_weather' }, { role: 'assistant', content: msg.content },
      { role: 'user', content: [{ type: 'tool_result', tool_use_id: use.id, content: '22 C, sunny' }] }] });
    assert.match(answer.content[0].text, /Tool results: \[get_weather\] 22 C, sunny$/);

    const thinking = { type: 'enabled', budget_tokens: 1024, display: 'summarized' };
    const q = { role: 'user', content: 'Why is the sky blue?' };
    const first = await client.messages.stream({ model: MODEL, max_tokens: 2048, thinking, messages: [q] })
      .finalMessage();
    assert.deepEqual(first.content.map((b) => b.type), ['thinking', 'text']);
    assert.ok(first.content[0].signature, 'Gemini\'s signature in the thinking block');
    const next = await client.messages.create({ model: MODEL, max_tokens: 2048, thinking,
      messages: [q, { role: 'assistant', content: first.content }, { role: 'user', content: 'And at sunset?' }] });
    assert.equal(next.content[0].type, 'thinking');
    const forged = structuredClone(first.content);
    forged[0].thinking += ' Or not.';
    await assert.rejects(client.messages.create({ model: MODEL, max_tokens: 2048, thinking,
      messages: [q, { role: 'assistant', content: forged }, { role: 'user', content: 'And?' }] }, { maxRetries: 0 }),
    (err) => {
      assert.ok(err instanceof Anthropic.APIError, String(err));
      assert.match(err.message, /Corrupted thought signature/);
      return true;
    });
  });
