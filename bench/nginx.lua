-- The nginx module's benchmark: build/aiorch run bench/nginx.lua [SECONDS] [ROUNDS]
-- In one run, on the same mock providers (0 ms, on CPU 1 with wrk), three
-- servers on CPU 0, one worker each:
--   * nginx with ngx_http_aiorch_module (aiorch_gateway),
--   * `aiorch serve` with the same gateway configuration,
--   * nginx proxy_pass to the mock (no orchestration: what nginx costs).
-- For each: its CPU time per request (utime + stime of the master and its
-- worker, from /proc, over a 64-connection run), p50/p99 latency at one
-- connection and requests/s at 64 (wrk). The same request throughout:
-- POST /v1/chat/completions to openai (X-Aiorch-Providers: openai). The
-- three are measured in turn, ROUNDS times (default 3), and each figure is
-- the median of its rounds: on a shared machine one run moves by 10%.
-- Target: the module costs no more CPU per request than `aiorch serve`.
-- Needs wrk and nginx with the module built (cmake --build build).
local aiorch = require "aiorch"

local fmt = string.format

local SECONDS = math.tointeger(tonumber((...) or "")) or 5
local ROUNDS = math.tointeger(tonumber((select(2, ...)) or "")) or 3
local BUILD = os.getenv("AIORCH_BUILD") or "build"
local EXE = BUILD .. "/aiorch"
local NGINX = os.getenv("AIORCH_NGINX") or "/usr/sbin/nginx"
local HOST = "127.0.0.1"
local ROOT = debug.getinfo(1, "S").source:match("^@(.*)/bench/[^/]+$") or "."
package.path = ROOT .. "/?.lua;" .. package.path
local bench = require "bench.support"

local sh_quote, capture, pin, start, stop_all = bench.sh_quote, bench.capture, bench.pin, bench.start,
  bench.stop_all
local free_port, write, PIN = bench.free_port, bench.write, bench.PIN

local function cwd()
  return (capture("pwd"):gsub("%s+$", ""))
end

local MODULE = os.getenv("AIORCH_NGINX_MODULE") or (cwd() .. "/" .. BUILD .. "/nginx/ngx_http_aiorch_module.so")
for _, need in ipairs { { "wrk", "command -v wrk" }, { NGINX, "test -x " .. NGINX },
                        { MODULE, "test -f " .. MODULE } } do
  if not os.execute(need[2] .. " >/dev/null 2>&1") then
    io.stderr:write("bench/nginx.lua: ", need[1], " is missing\n")
    return 1
  end
end

-- Servers on CPU 0; the mock, wrk and this process on CPU 1.
bench.pin_self(1)

local TMP = bench.workdir("nginx-bench")
os.execute("chmod 755 " .. TMP) -- nginx's workers run as nobody: they read the configuration

local wait_up = bench.wait_up

------------------------------------------------------------------------------
-- The servers

local mock_port = bench.start_mock(EXE, pin(1))
local MOCK = fmt("http://%s:%d", HOST, mock_port)

-- The same gateway configuration for aiorch serve and the module: no
-- access lines (nginx's access log is off too).
local CONFIG = TMP .. "/gateway.lua"
write(CONFIG, fmt([[return {
  access_log = false,
  providers = {
    openai = { api_key_env = "OPENAI_API_KEY", base_url = %q },
    anthropic = { api_key_env = "ANTHROPIC_API_KEY", base_url = %q },
  },
}
]], MOCK .. "/v1", MOCK))
local KEYS = { OPENAI_API_KEY = "sk-bench", ANTHROPIC_API_KEY = "sk-ant-bench" }

local function start_nginx(name, location)
  local port = free_port()
  local prefix = TMP .. "/" .. name
  os.execute("mkdir -p " .. sh_quote(prefix))
  write(prefix .. "/nginx.conf", fmt([[
daemon off;
master_process on;
worker_processes 1;
error_log %s/error.log warn;
pid %s/nginx.pid;
load_module %s;
env OPENAI_API_KEY;
env ANTHROPIC_API_KEY;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path %s/body;
  proxy_temp_path %s/proxy;
  fastcgi_temp_path %s/fastcgi;
  uwsgi_temp_path %s/uwsgi;
  scgi_temp_path %s/scgi;
  aiorch_root %s;
  upstream mock { server 127.0.0.1:%d; keepalive 64; }
  server {
    listen 127.0.0.1:%d;
    location / { %s }
  }
}
]], prefix, prefix, MODULE, prefix, prefix, prefix, prefix, prefix, cwd(), mock_port, port, location))
  local log = prefix .. "/stdout.log"
  local pid = start(pin(0) .. NGINX .. " -p " .. prefix .. " -c " .. prefix .. "/nginx.conf -e "
    .. prefix .. "/error.log", KEYS, log)
  local url = fmt("http://%s:%d", HOST, port)
  wait_up("nginx (" .. name .. ")", pid, url .. "/v1/models", log)
  return { pid = pid, url = url, log = log }
end

local function start_serve()
  local port = free_port()
  local log = TMP .. "/serve.log"
  local pid = start(pin(0) .. EXE .. " serve --workers 1 --listen " .. HOST .. ":" .. port .. " --config "
    .. CONFIG, KEYS, log)
  local url = fmt("http://%s:%d", HOST, port)
  wait_up("aiorch serve", pid, url .. "/healthz", log)
  aiorch.sleep(200) -- its worker up
  return { pid = pid, url = url, log = log }
end

------------------------------------------------------------------------------
-- wrk

local BODY = bench.BODY

local function wrk(url, conns, seconds)
  return bench.wrk(TMP, url, conns, seconds, { providers = "openai" })
end

-- One check that the route answers 200 (else the figures mean nothing).
local function check(s)
  local status, _, body = aiorch.http.request { method = "POST", url = s.url .. "/v1/chat/completions",
    body = BODY, headers = { ["content-type"] = "application/json", ["x-aiorch-providers"] = "openai" } }
  assert(status == 200, fmt("%s answered %s: %s", s.name, tostring(status), tostring(body):sub(1, 300)))
end

local function measure(s)
  local one = wrk(s.url, 1, SECONDS)
  local pids = bench.tree(s.pid)
  local c0 = bench.cpu_seconds(pids)
  local many = wrk(s.url, 64, SECONDS)
  local cpu = bench.cpu_seconds(pids) - c0
  return { cpu_us = cpu / many.requests * 1e6, p50 = one.p50, p99 = one.p99, rps = many.rps,
           errors = one.errors + many.errors }
end

local function median(list, key)
  local v = {}
  for i, r in ipairs(list) do v[i] = r[key] end
  table.sort(v)
  return v[(#v + 1) // 2]
end

local servers = {
  { name = "nginx + aiorch module",
    make = function() return start_nginx("module", "aiorch_config " .. CONFIG .. "; aiorch_gateway;") end },
  { name = "aiorch serve", make = start_serve },
  { name = "nginx proxy_pass", make = function()
      return start_nginx("proxy", 'proxy_pass http://mock; proxy_http_version 1.1; proxy_set_header Connection "";')
    end },
}
local ok, err = pcall(function()
  for _, def in ipairs(servers) do
    def.s = def.make()
    def.s.name = def.name
    check(def.s)
    wrk(def.s.url, 8, 1) -- warm-up
    def.runs = {}
  end
  for _ = 1, ROUNDS do
    for _, def in ipairs(servers) do
      def.runs[#def.runs + 1] = measure(def.s)
    end
  end
end)
stop_all()
if not ok then
  error(err, 0)
end
local rows = {}
for _, def in ipairs(servers) do
  local errors = 0
  for _, r in ipairs(def.runs) do errors = errors + r.errors end
  rows[#rows + 1] = { name = def.name, cpu_us = median(def.runs, "cpu_us"), p50 = median(def.runs, "p50"),
                      p99 = median(def.runs, "p99"), rps = median(def.runs, "rps"), errors = errors }
end
os.execute("rm -rf " .. sh_quote(TMP))

print(fmt("nginx module benchmark: %ds per run, medians of %d rounds, one worker each on CPU %s, "
  .. "mock and wrk on CPU %s", SECONDS, ROUNDS, PIN and "0" or "any", PIN and "1" or "any"))
print(fmt("%-24s %12s %10s %10s %12s %7s", "server", "CPU/request", "p50 c=1", "p99 c=1", "req/s c=64", "errors"))
for _, r in ipairs(rows) do
  print(fmt("%-24s %9.1f us %7d us %7d us %12.0f %7d", r.name, r.cpu_us, r.p50, r.p99, r.rps, r.errors))
end
local module, serve = rows[1], rows[2]
print(fmt("target: the module costs no more CPU per request than aiorch serve  %s (%.1f vs %.1f us)",
  module.cpu_us <= serve.cpu_us and "met" or "NOT met", module.cpu_us, serve.cpu_us))
return 0
