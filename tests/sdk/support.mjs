// Helpers shared by the SDK tests (tests/sdk/*.test.mjs): the aiorch
// processes they start (the mock providers, the recording upstream,
// `aiorch serve`), stopped by PID in after() and on exit.
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
