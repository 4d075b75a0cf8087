// Helpers shared by the SDK tests (tests/sdk/*.test.mjs): the aiorch
// processes they start (the mock providers, the recording upstream,
// `aiorch serve`), stopped by PID in after() and on exit.
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { createServer } from 'node:net';
import { createInterface } from 'node:readline';
import { resolve, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
export const AIORCH = resolve(ROOT, process.env.AIORCH_BUILD || 'build', 'aiorch');
export const HOST = '127.0.0.1';

// Whether AIORCH runs at all (built), and whether it has `serve`.
export function built() {
  return spawnSync(AIORCH, ['--help']).status === 0;
}

export function hasServe() {
  const r = spawnSync(AIORCH, ['--help'], { encoding: 'utf8' });
  return r.status === 0 && /^\s*serve\b/m.test(r.stdout);
}

// The path prefix that carries mock directives ('a=1,b=2'), or ''.
export const mockPrefix = (dirs) => (dirs ? `/_mock/${dirs}` : '');

export function freePort() {
  return new Promise((ok, fail) => {
    const s = createServer();
    s.once('error', fail);
    s.listen(0, HOST, () => {
      const { port } = s.address();
      s.close(() => ok(port));
    });
  });
}

// Every process started here.
const children = new Set();

// Starts `aiorch ARGS` in its own process group, from the repository's
// root; keeps the tail of its stderr (child.log) for failure messages.
export function start(args, env = {}) {
  const child = spawn(AIORCH, args, {
    cwd: ROOT, env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'], detached: true,
  });
  child.log = '';
  child.stderr.on('data', (d) => { child.log = (child.log + d).slice(-8000); });
  children.add(child);
  child.once('exit', () => children.delete(child));
  return child;
}

function kill(child) {
  try { process.kill(-child.pid, 'SIGKILL'); } catch { /* already gone */ }
  try { child.kill('SIGKILL'); } catch { /* already gone */ }
}

// SIGTERM, then SIGKILL to its process group after 5 s.
export function stop(child) {
  return new Promise((done) => {
    if (child.exitCode !== null || child.signalCode !== null) return done();
    const timer = setTimeout(() => kill(child), 5000);
    child.once('exit', () => { clearTimeout(timer); done(); });
    try { child.kill('SIGTERM'); } catch { clearTimeout(timer); done(); }
  });
}

export function stopAll() {
  return Promise.all([...children].map(stop));
}

process.on('exit', () => {
  for (const c of children) kill(c);
});

// The numbers of the first line a child prints, which must match pattern
// (what: the child, for the messages); within 10 s.
export async function firstLine(child, pattern, what) {
  const lines = createInterface({ input: child.stdout });
  const m = await new Promise((ok, fail) => {
    const t = setTimeout(() => fail(new Error(`${what} did not print its port: ${child.log}`)), 10000);
    lines.once('line', (l) => {
      clearTimeout(t);
      const got = pattern.exec(l);
      got ? ok(got) : fail(new Error(`unexpected first line from ${what}: ${l}`));
    });
    child.once('exit', (code) => fail(new Error(`${what} exited (${code}): ${child.log}`)));
  });
  child.stdout.resume();
  return m.slice(1).map(Number);
}

// Starts the mock providers (tests/mock_server.lua with more arguments);
// returns { child, port, url }.
export async function startMock(extraArgs = []) {
  const child = start(['run', 'tests/mock_server.lua', ...extraArgs]);
  const [port] = await firstLine(child, /^PORT (\d+)$/, 'the mock');
  return { child, port, url: `http://${HOST}:${port}` };
}

// Starts `aiorch serve --listen` on a free port with more arguments and
// env; waits until /healthz answers 200 (or a status `ready` accepts).
// Returns { child, url }.
export async function startServe(args, env, ready = (status) => status === 200) {
  const port = await freePort();
  const child = start(['serve', '--listen', `${HOST}:${port}`, ...args], env);
  child.stdout.resume();
  const url = `http://${HOST}:${port}`;
  const deadline = Date.now() + 15000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`aiorch serve exited (${child.exitCode}): ${child.log}`);
    try {
      const r = await fetch(url + '/healthz');
      await r.arrayBuffer();
      if (ready(r.status)) break;
    } catch { /* not listening yet */ }
    if (Date.now() > deadline) throw new Error('aiorch serve did not become healthy: ' + child.log);
    await new Promise((r) => setTimeout(r, 50));
  }
  return { child, url };
}

// What value breaks in schema (a list of Standard Schema issues; empty: valid).
// Enough JSON Schema for the tests' schemas and the SDKs' strict rewrites.
export function schemaIssues(schema, value, root = schema, path = []) {
  const issue = (message) => [{ message, path }];
  if (schema === true || schema === undefined) return [];
  if (schema.$ref) {
    const target = schema.$ref.replace(/^#\/?/, '').split('/').filter(Boolean)
      .reduce((node, key) => node?.[key], root);
    return target ? schemaIssues(target, value, root, path) : issue(`unresolved ${schema.$ref}`);
  }
  if (schema.anyOf) {
    const fits = schema.anyOf.some((s) => schemaIssues(s, value, root, path).length === 0);
    return fits ? [] : issue('no anyOf branch fits');
  }
  if ('const' in schema && value !== schema.const) return issue(`not ${schema.const}`);
  if (schema.enum && !schema.enum.includes(value)) return issue(`not one of ${schema.enum}`);
  const types = [].concat(schema.type ?? []);
  const typeOf = (v) => (v === null ? 'null' : Array.isArray(v) ? 'array'
    : Number.isInteger(v) ? 'integer' : typeof v);
  if (types.length && !types.some((t) => t === typeOf(value) || (t === 'number' && typeOf(value) === 'integer'))) {
    return issue(`expected ${types.join('|')}, got ${typeOf(value)}`);
  }
  const out = [];
  if (typeOf(value) === 'object') {
    for (const k of schema.required ?? []) if (!(k in value)) out.push(...issue(`missing ${k}`));
    for (const [k, v] of Object.entries(value)) {
      const sub = schema.properties?.[k];
      if (sub !== undefined) out.push(...schemaIssues(sub, v, root, [...path, k]));
      else if (schema.additionalProperties === false) out.push(...issue(`unexpected ${k}`));
    }
  } else if (typeOf(value) === 'array') {
    if (schema.minItems !== undefined && value.length < schema.minItems) out.push(...issue('too few items'));
    if (schema.maxItems !== undefined && value.length > schema.maxItems) out.push(...issue('too many items'));
    value.forEach((v, i) => out.push(...schemaIssues(schema.items, v, root, [...path, i])));
  } else if (typeof value === 'number') {
    if (schema.minimum !== undefined && value < schema.minimum) out.push(...issue('below minimum'));
    if (schema.maximum !== undefined && value > schema.maximum) out.push(...issue('above maximum'));
  } else if (typeof value === 'string') {
    if (schema.minLength !== undefined && value.length < schema.minLength) out.push(...issue('too short'));
    if (schema.maxLength !== undefined && value.length > schema.maxLength) out.push(...issue('too long'));
  }
  return out;
}

export function assertValid(schema, value) {
  assert.deepEqual(schemaIssues(schema, value), [], JSON.stringify(value));
}

// Every chunk of a Gemini SDK stream, the text of its parts (not the
// thoughts) joined, and the last chunk.
export async function collectGemini(stream) {
  const chunks = [];
  let text = '';
  for await (const c of stream) {
    chunks.push(c);
    for (const p of c.candidates?.[0]?.content?.parts ?? []) if (p.text && !p.thought) text += p.text;
  }
  return { chunks, text, last: chunks[chunks.length - 1] };
}
