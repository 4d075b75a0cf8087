-- A real nginx (Debian's package) with ngx_http_aiorch_module loaded, for
-- the tests: a temporary prefix, daemon off, a master and N workers, one
-- server on 127.0.0.1 per entry given.
--   local nginx = require "tests.nginx_host"
--   if nginx.missing() then ... end
--   local n = nginx.start { servers = { { name = "gw", config = "return {...}" } }, env = {...} }
--   n.base("gw"); n.reload(); n.stop()
local aiorch = require "aiorch"
local support = require "tests.support"

local process = aiorch.process
local fmt = string.format

local _M = {}

-- nginx gets absolute paths: it resolves relative ones against its prefix.
local function absolute(path)
  if path:sub(1, 1) == "/" then
    return path
  end
  local p = io.popen("pwd")
  local cwd = p:read("l")
  p:close()
  return cwd .. "/" .. path:gsub("^%./", "")
end

local ROOT = aiorch.root
local BUILD = absolute(os.getenv("AIORCH_BUILD") or (ROOT .. "/build"))
_M.ROOT = ROOT
_M.NGINX = os.getenv("AIORCH_NGINX") or "/usr/sbin/nginx"
_M.MODULE = absolute(os.getenv("AIORCH_NGINX_MODULE") or (BUILD .. "/nginx/ngx_http_aiorch_module.so"))

local function exists(path)
  local f = io.open(path, "rb")
  if f then
    f:close()
    return true
  end
  return false
end

-- Why nginx cannot run here, or nil.
function _M.missing()
  if not exists(_M.NGINX) then
    return _M.NGINX .. " is missing (apt-get install nginx nginx-dev; .ci/setup)"
  end
  if not exists(_M.MODULE) then
    return _M.MODULE .. " is missing (build it: cmake --build build; needs nginx-dev)"
  end
  return nil
end

-- A Lua literal of a string.
function _M.quote(s)
  return fmt("%q", s)
end

-- opts: servers = { {name, config = Lua text of an aiorch_config | nil (none:
-- the environment), handler = a Lua file (aiorch_handler), http2 = true,
-- tls = {cert = file, key = file} (HTTPS; readiness is not probed),
-- directives = more lines in the server block, location = more lines in the
-- location} }; env = variables nginx gets (and passes on to its workers);
-- workers (default 2); http = more lines in the http block; main = more
-- lines at the top; wrapper = a command list put before nginx (valgrind).
-- Returns {prefix, pid, ports = {name = port}, base(name), reload(), stop(),
-- log() (the error log: aiorch's lines too)}.
function _M.start(opts)
  local prefix = support.tmpdir()
  local env_lines, env = {}, {}
  for k, v in pairs(opts.env or {}) do
    env[k] = v
    env_lines[#env_lines + 1] = fmt("env %s;", k)
  end
  table.sort(env_lines)
  local servers, ports = {}, {}
  for _, s in ipairs(opts.servers) do
    local port = support.free_port()
    ports[s.name] = port
    local handler
    if s.handler then
      handler = fmt("aiorch_handler %s;", s.handler)
    else
      handler = "aiorch_gateway;"
      if s.config then
        local file = fmt("%s/%s.lua", prefix, s.name)
        support.write(file, s.config)
        handler = fmt("aiorch_config %s;\n      aiorch_gateway;", file)
      end
    end
    local tls = ""
    if s.tls then
      tls = fmt("ssl_certificate %s;\n    ssl_certificate_key %s;", s.tls.cert, s.tls.key)
    end
    servers[#servers + 1] = fmt([[
  server {
    listen 127.0.0.1:%d%s%s;
    %s
    %s
    location / {
      %s
      %s
    }
  }]], port, s.tls and " ssl" or "", s.http2 and " http2" or "", tls, s.directives or "", handler,
      s.location or "")
  end
  local conf = fmt([[
daemon off;
master_process on;
worker_processes %d;
error_log %s/error.log info;
pid %s/nginx.pid;
load_module %s;
%s
%s
events { worker_connections 1024; }
http {
  access_log %s/access.log;
  client_body_temp_path %s/body;
  proxy_temp_path %s/proxy;
  fastcgi_temp_path %s/fastcgi;
  uwsgi_temp_path %s/uwsgi;
  scgi_temp_path %s/scgi;
  aiorch_root %s;
%s
%s
}
]], opts.workers or 2, prefix, prefix, _M.MODULE, table.concat(env_lines, "\n"), opts.main or "",
    prefix, prefix, prefix, prefix, prefix, prefix, ROOT, opts.http or "", table.concat(servers, "\n"))
  support.write(prefix .. "/nginx.conf", conf)
  local argv = {}
  for _, a in ipairs(opts.wrapper or {}) do
    argv[#argv + 1] = a
  end
  for _, a in ipairs({ _M.NGINX, "-p", prefix, "-c", prefix .. "/nginx.conf", "-e", prefix .. "/error.log" }) do
    argv[#argv + 1] = a
  end
  -- A module built under the sanitizers needs their runtime in nginx
  -- (AIORCH_NGINX_PRELOAD, set by tests/CMakeLists.txt); nginx's own
  -- memory at exit is not ours to check (tests/nginx_valgrind.lua is).
  local preload = os.getenv("AIORCH_NGINX_PRELOAD")
  if preload and preload ~= "" then
    env.LD_PRELOAD = preload
    env.ASAN_OPTIONS = "detect_leaks=0:abort_on_error=0"
  end
  local pid = assert(process.spawn(argv, { env = env, stdout = prefix .. "/stdout", stderr = prefix .. "/stderr",
    death_signal = "TERM" }))
  local n = { prefix = prefix, pid = pid, ports = ports, conf = conf }
  function n.base(name)
    return "http://127.0.0.1:" .. ports[name]
  end
  function n.log()
    return support.slurp(prefix .. "/error.log") .. support.slurp(prefix .. "/stderr")
  end
  function n.access()
    return support.slurp(prefix .. "/access.log")
  end
  -- SIGHUP: new workers with the configuration read again; the old ones
  -- finish what they serve, then exit.
  function n.reload()
    return process.kill(n.pid, "HUP")
  end
  -- SIGQUIT (graceful) or SIGTERM (fast); returns the exit code.
  function n.stop(how)
    if n.pid then
      process.kill(n.pid, how or "QUIT")
      local code, kind = process.wait(n.pid, support.stretch(opts.stop_ms or 20000))
      if kind == "timeout" then
        process.kill(n.pid, "KILL")
        code = process.wait(n.pid)
      end
      n.pid = nil
      return code
    end
  end
  -- Up when every server answers (any status); an HTTP/2-only one
  -- (h2c, prior knowledge) shares the workers of the others.
  local h2 = {}
  for _, s in ipairs(opts.servers) do
    h2[s.name] = s.http2 or s.tls
  end
  for name in pairs(ports) do
    if not h2[name] and not support.wait_up(n.base(name) .. "/healthz", support.stretch(opts.start_ms or 15000)) then
      local log = n.log()
      n.stop("TERM")
      error("nginx did not start: " .. log .. "\n" .. conf)
    end
  end
  return n
end

-- The pids of the workers (children of the master) at this moment.
function _M.workers(n)
  local p = io.popen("pgrep -P " .. n.pid .. " 2>/dev/null")
  local out = {}
  for line in p:lines() do
    out[#out + 1] = tonumber(line)
  end
  p:close()
  return out
end

return _M
