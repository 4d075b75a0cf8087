// Google's official Gemini client (@google/genai), unchanged but for its
// base URL, pointed straight at the mock's Gemini API (tests/mock_server.lua,
// no gateway): every answer must parse in the SDK, plain and streamed, and
// the parsed objects say what the mock meant: text, function calling (by
// hand and through the SDK's automatic function calling), JSON output,
// thinking with signatures that go back and are verified, usage, stop
// sequences, candidates, and errors as the SDK's ApiError.
//   node --test tests/sdk/gemini.test.mjs     (from the repository root; CTest: sdk_clients)
// AIORCH_BUILD names the build directory (default: build).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import {
  GoogleGenAI, ApiError, Type, FunctionCallingConfigMode, createPartFromFunctionResponse, createUserContent,
} from '@google/genai';
import { AIORCH, assertValid, built, collectGemini, startMock, stopAll } from './support.mjs';

const MODEL = 'gemini-2.5-flash';
const PNG = 'iVBORw0KGgo='; // the PNG signature
const PDF = 'JVBERi0xLjQK'; // %PDF-1.4

const SKIP = built() ? false : `${AIORCH} is not built`;

const WEATHER = {
  type: 'object',
  properties: {
    city: { type: 'string', description: 'The city' },
    unit: { type: 'string', enum: ['celsius', 'fahrenheit'] },
    days: { type: 'integer', minimum: 1, maximum: 7 },
    tags: { type: 'array', items: { type: 'string' }, minItems: 1 },
  },
  required: ['city', 'unit', 'days', 'tags'],
  additionalProperties: false,
};
// The same kind of schema in Gemini's own form (the SDK's Type enum).
const TIME = {
  type: Type.OBJECT,
  properties: { zone: { type: Type.STRING }, hour24: { type: Type.BOOLEAN } },
  required: ['zone', 'hour24'],
};
const TIME_JSON = {
  type: 'object', properties: { zone: { type: 'string' }, hour24: { type: 'boolean' } }, required: ['zone', 'hour24'],
};
const PERSON = {
  type: 'object',
  properties: {
    name: { type: 'string' },
    age: { type: 'integer', minimum: 0, maximum: 150 },
    pets: { type: 'array', items: { type: 'object', properties: { kind: { type: 'string', enum: ['cat', 'dog'] } },
      required: ['kind'] } },
  },
  required: ['name', 'age', 'pets'],
};
const TOOLS = [{ functionDeclarations: [
  { name: 'get_weather', description: 'Weather now', parametersJsonSchema: WEATHER },
  { name: 'get_time', description: 'Time now', parameters: TIME },
] }];

// --- The mock server -----------------------------------------------------------

let base = '';

before(async () => {
  if (SKIP) return;
  base = (await startMock(['--port', '0'])).url;
});

after(stopAll);

// A client of the mock, with directives in the path when given ('a=1,b=2').
const gemini = (dirs) => new GoogleGenAI({
  apiKey: 'gemini-test-key', httpOptions: { baseUrl: `${base}${dirs ? `/_mock/${dirs}` : ''}` },
});
const ask = (contents, config = {}) => ({ model: MODEL, contents, config });
const LONG = (n) => `${randomUUID()} ` + 'lorem ipsum dolor sit amet '.repeat(n);

const collect = collectGemini;

// --- Text ------------------------------------------------------------------------

test('gemini: generateContent and generateContentStream give the same answer, with usage', { skip: SKIP },
  async () => {
    const client = gemini();
    const r = await client.models.generateContent(ask('What is the capital of France?'));
    assert.match(r.text, /^Hello from the mock gemini provider\. You asked: What is the capital of France\?$/);
    assert.equal(r.candidates[0].finishReason, 'STOP');
    assert.equal(r.modelVersion, MODEL);
    assert.match(r.responseId, /^mock-gemini-/);
    const u = r.usageMetadata;
    assert.ok(u.promptTokenCount > 0 && u.candidatesTokenCount > 0, JSON.stringify(u));
    assert.equal(u.totalTokenCount, u.promptTokenCount + u.candidatesTokenCount);

    const { chunks, text, last } = await collect(await client.models.generateContentStream(
      ask('What is the capital of France?')));
    assert.ok(chunks.length >= 3, `${chunks.length} chunks`);
    assert.equal(text, r.text);
    assert.equal(last.candidates[0].finishReason, 'STOP');
    assert.deepEqual(last.usageMetadata.candidatesTokenCount, u.candidatesTokenCount);
    for (const c of chunks.slice(0, -1)) assert.equal(c.candidates[0].finishReason, undefined);
  });

test('gemini: a chat keeps the turns, images and documents are seen', { skip: SKIP }, async () => {
  const chat = gemini().chats.create({ model: MODEL });
  const first = await chat.sendMessage({ message: [
    { text: 'What is in these?' },
    { inlineData: { mimeType: 'image/png', data: PNG } },
    { fileData: { fileUri: 'https://example.com/cat.jpg', mimeType: 'image/jpeg' } },
    { inlineData: { mimeType: 'application/pdf', data: PDF } },
  ] });
  assert.ok(first.text.endsWith('I see 2 images and 1 document.'), first.text);
  const second = await chat.sendMessage({ message: 'And now?' });
  assert.match(second.text, /You asked: And now\? I see 2 images and 1 document\.$/); // the whole conversation
  assert.equal(chat.getHistory().length, 4);
});

// --- Function calling ------------------------------------------------------------

test('gemini: function calls from declarations, answered with createPartFromFunctionResponse', { skip: SKIP },
  async () => {
    const client = gemini();
    const contents = [createUserContent('What is the weather in Paris? Use get_weather.')];
    const config = { tools: TOOLS };
    for (const r of [await client.models.generateContent(ask(contents, config)),
      (await collect(await client.models.generateContentStream(ask(contents, config)))).last]) {
      const calls = r.functionCalls;
      assert.deepEqual(calls.map((c) => c.name), ['get_weather']);
      assertValid(WEATHER, calls[0].args);
      assert.equal(r.candidates[0].finishReason, 'STOP');
    }
    const r = await client.models.generateContent(ask(contents, config));
    const answer = await client.models.generateContent(ask([...contents, r.candidates[0].content,
      createUserContent([createPartFromFunctionResponse('', 'get_weather', { output: '22 C, sunny' })])], config));
    assert.match(answer.text, /Tool results: \[get_weather\] 22 C, sunny$/);
    assert.equal(answer.functionCalls, undefined);

    // ANY with allowedFunctionNames, Gemini's own schema, parallel calls
    const both = ask('get_time and get_weather', { tools: TOOLS });
    assert.deepEqual((await client.models.generateContent(both)).functionCalls.map((c) => c.name),
      ['get_weather', 'get_time']);
    const forced = await client.models.generateContent(ask('Hi', { tools: TOOLS, toolConfig: {
      functionCallingConfig: { mode: FunctionCallingConfigMode.ANY, allowedFunctionNames: ['get_time'] } } }));
    assert.deepEqual(forced.functionCalls.map((c) => c.name), ['get_time']);
    assertValid(TIME_JSON, forced.functionCalls[0].args);
    const none = await client.models.generateContent(ask('use get_time', { tools: TOOLS, toolConfig: {
      functionCallingConfig: { mode: FunctionCallingConfigMode.NONE } } }));
    assert.equal(none.functionCalls, undefined);
    assert.match(none.text, /^Hello from the mock gemini provider/);
  });

test('gemini: automatic function calling runs CallableTools and gets an answer quoting their results',
  { skip: SKIP }, async () => {
    for (const stream of [false, true]) {
      const seen = [];
      const weather = {
        tool: async () => TOOLS[0],
        callTool: async (calls) => calls.map((c) => {
          seen.push(c);
          return createPartFromFunctionResponse(c.id ?? '', c.name,
            c.name === 'get_weather' ? { output: '22 C, sunny' } : { time: '12:00' });
        }),
      };
      const params = ask('Weather and time in Paris: get_weather and get_time', { tools: [weather] });
      let text;
      let final;
      if (stream) {
        const out = await collect(await gemini().models.generateContentStream(params));
        text = out.text;
        final = out.last;
      } else {
        final = await gemini().models.generateContent(params);
        text = final.text;
        assert.equal(final.automaticFunctionCallingHistory.length, 3);
      }
      assert.deepEqual(seen.map((c) => c.name), ['get_weather', 'get_time']);
      assertValid(WEATHER, seen[0].args);
      assert.ok(text.endsWith('Tool results: [get_weather] 22 C, sunny; [get_time] {"time":"12:00"}'), text);
      assert.equal(final.candidates[0].finishReason, 'STOP');
    }
  });

// --- JSON output -----------------------------------------------------------------

test('gemini: JSON output from responseJsonSchema and responseSchema, plain and streamed', { skip: SKIP },
  async () => {
    const client = gemini();
    const config = { responseMimeType: 'application/json', responseJsonSchema: PERSON };
    const r = await client.models.generateContent(ask('Who is it?', config));
    const person = JSON.parse(r.text);
    assertValid(PERSON, person);
    const { text } = await collect(await client.models.generateContentStream(ask('Who is it?', config)));
    assert.deepEqual(JSON.parse(text), person);
    const typed = await client.models.generateContent(ask('What time?', { responseMimeType: 'application/json',
      responseSchema: TIME }));
    assertValid(TIME_JSON, JSON.parse(typed.text));
    const loose = await client.models.generateContent(ask('Hi', { responseMimeType: 'application/json' }));
    assert.match(JSON.parse(loose.text).answer, /^Hello from the mock gemini provider/);
  });

// --- Thinking --------------------------------------------------------------------

test('gemini: thinking round trip: the chat sends the thought signatures back and the mock verifies them',
  { skip: SKIP }, async () => {
    const thinkingConfig = { includeThoughts: true, thinkingBudget: 1024 };
    for (const stream of [false, true]) {
      const chat = gemini().chats.create({ model: MODEL, config: { thinkingConfig } });
      let parts;
      let usage;
      if (stream) {
        const out = await collect(await chat.sendMessageStream({ message: 'Why is the sky blue?' }));
        parts = out.chunks.flatMap((c) => c.candidates[0].content.parts);
        usage = out.last.usageMetadata;
      } else {
        const r = await chat.sendMessage({ message: 'Why is the sky blue?' });
        parts = r.candidates[0].content.parts;
        usage = r.usageMetadata;
      }
      const thoughts = parts.filter((p) => p.thought);
      assert.ok(thoughts.length >= 1);
      assert.match(thoughts.map((p) => p.text).join(''), /^The user asks: "Why is the sky blue\?"/);
      assert.match(thoughts[thoughts.length - 1].thoughtSignature, /^[A-Za-z0-9+/]+=*$/);
      assert.ok(usage.thoughtsTokenCount > 0, JSON.stringify(usage));
      const next = await chat.sendMessage({ message: 'And at sunset?' });
      assert.equal(next.sdkHttpResponse.headers['x-mock-thinking-verified'], 'true');

      // a thought changed under its signature
      const history = chat.getHistory();
      const model = history.find((c) => c.role === 'model');
      model.parts.find((p) => p.thought).text += ' Or not.';
      await assert.rejects(gemini().models.generateContent(ask([...history, createUserContent('Well?')],
        { thinkingConfig })), (err) => {
        assert.ok(err instanceof ApiError, String(err));
        assert.equal(err.status, 400);
        assert.match(err.message, /Corrupted thought signature/);
        assert.match(err.message, /INVALID_ARGUMENT/);
        return true;
      });
    }
    // without the thoughts shown: the first function call is signed
    const client = gemini();
    const contents = [createUserContent('use get_time')];
    const r = await client.models.generateContent(ask(contents, { tools: TOOLS, thinkingConfig: { thinkingBudget: 512 } }));
    const call = r.candidates[0].content.parts[0];
    assert.ok(call.functionCall && call.thoughtSignature, JSON.stringify(call));
    const back = await client.models.generateContent(ask([...contents, r.candidates[0].content,
      createUserContent([createPartFromFunctionResponse('', 'get_time', { output: '12:00' })])], { tools: TOOLS }));
    assert.equal(back.sdkHttpResponse.headers['x-mock-thinking-verified'], 'true');
  });

// --- Caching, stop sequences, candidates, finish reasons ------------------------

test('gemini: a long prefix seen again reports cachedContentTokenCount', { skip: SKIP }, async () => {
  const client = gemini();
  const config = { systemInstruction: LONG(240) };
  const first = await client.models.generateContent(ask('first', config));
  assert.equal(first.usageMetadata.cachedContentTokenCount, undefined);
  const { last } = await collect(await client.models.generateContentStream(ask('first', config)));
  assert.ok(last.usageMetadata.cachedContentTokenCount >= 1024, JSON.stringify(last.usageMetadata));
});

test('gemini: stop sequences, candidateCount, finish reasons', { skip: SKIP }, async () => {
  const stop = await gemini('text=one%20two%20three%20four').models.generateContent(ask('count',
    { stopSequences: ['three'] }));
  assert.equal(stop.text, 'one two ');
  assert.equal(stop.candidates[0].finishReason, 'STOP');

  const two = await gemini().models.generateContent(ask('Pick', { candidateCount: 2 }));
  assert.deepEqual(two.candidates.map((c) => c.index), [0, 1]);
  assert.equal(two.candidates[1].content.parts[0].text, `${two.text} (candidate 1)`);

  const safety = await gemini('finish_reason=SAFETY').models.generateContent(ask('Something risky'));
  assert.equal(safety.candidates[0].finishReason, 'SAFETY');
  assert.ok(safety.candidates[0].safetyRatings.some((r) => r.blocked));
  const streamed = await collect(await gemini('finish_reason=SAFETY').models.generateContentStream(
    ask('Something risky')));
  assert.equal(streamed.last.candidates[0].finishReason, 'SAFETY');
  assert.equal(streamed.text, safety.text);
});

// --- Errors ----------------------------------------------------------------------

test('gemini: errors are the SDK\'s ApiError with the status, plain and streamed', { skip: SKIP }, async () => {
  for (const [fault, status, name] of [['429', 429, 'RESOURCE_EXHAUSTED'], ['500', 500, 'INTERNAL'],
    ['401', 401, 'UNAUTHENTICATED']]) {
    await assert.rejects(gemini(`fault=${fault}`).models.generateContent(ask('Hi')), (err) => {
      assert.ok(err instanceof ApiError, String(err));
      assert.equal(err.status, status);
      assert.equal(JSON.parse(err.message).error.status, name);
      return true;
    });
    await assert.rejects(gemini(`fault=${fault}`).models.generateContentStream(ask('Hi')), ApiError);
  }
  // what the API refuses: a 400 naming the field
  await assert.rejects(gemini().models.generateContent(ask([createUserContent([
    createPartFromFunctionResponse('', 'get_time', { output: '1' })])])), (err) => {
    assert.ok(err instanceof ApiError);
    assert.equal(err.status, 400);
    assert.match(err.message, /function_response/);
    return true;
  });
  // an error chunk in a stream that began with a 200: the SDK raises it
  let text = '';
  await assert.rejects((async () => {
    for await (const c of await gemini('fault=error200').models.generateContentStream(ask('Hi'))) text += c.text ?? '';
  })(), (err) => {
    assert.ok(err instanceof ApiError, String(err));
    assert.equal(err.status, 500);
    return true;
  });
  assert.equal(text, '');
});
