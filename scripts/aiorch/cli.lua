-- The `aiorch` command: main(args) -> exit status.
-- 0 success (parallel: at least one provider answered), 1 failure, 2 usage.
local orchestrate = require "aiorch.orchestrate"
local response = require "aiorch.response"
local policy = require "aiorch.policy"

local fmt = string.format
local type = type
local ipairs = ipairs
local tostring = tostring
local tonumber = tonumber
local concat = table.concat
local unpack = table.unpack
local io_stdout = io.stdout
local io_stderr = io.stderr

local _M = {}

_M.usage = [[
usage: aiorch <command> [options]

commands:
  ask [options] QUESTION     ask the providers and print the answer
  run SCRIPT.lua [ARGS...]   run a Lua script inside the runtime (as the main task)
  demo                       run every strategy against built-in mock providers (no keys needed)
  serve [options]            run the gateway (OpenAI- and Anthropic-compatible HTTP API)
  help, --help               show this help
  --version                  show the version

ask options:
  --strategy S        single | parallel | fallback (default) | fastest | a user strategy
  --providers a,b     providers in priority order (default: every available one)
  --context TEXT      context for the question
  --system TEXT       system prompt (default: built from the context)
  --temperature T     sampling temperature, within every chosen provider's range
  --max-tokens N      at most N tokens in the answer
  --json              print the StandardAIResponse (a JSON array for parallel)
  --stream            print the answer as it arrives (single, fallback, fastest)
  --policy K=V,...    this request's retries, deadlines and streaming policy, e.g.
                      max_attempts=3,first_token_timeout_ms=5000,continue_on_cut=true
  --path DIR          a user directory searched first for strategies/, providers/ and
                      prompts/ (repeatable; AIORCH_PATH holds more, ':'-separated)

serve options:
  --listen HOST:PORT  address to listen on (default 127.0.0.1:8080, or the config's)
  --config FILE       the gateway's Lua configuration (providers, aliases, client keys)
  --path DIR          as for ask
  --workers N         worker processes sharing the port, under a master that restarts them
                      (default: the number of cores; 0: serve from this one process)
  endpoints: POST /v1/chat/completions, POST /v1/messages, POST /v1/orchestrate,
             GET /v1/models, GET /healthz, GET /metrics

environment:
  OPENAI_API_KEY, ANTHROPIC_API_KEY     a provider is available when its key is set
  OPENAI_BASE_URL, ANTHROPIC_BASE_URL   point a provider at a compatible server
  OPENAI_MODEL, ANTHROPIC_MODEL         use another model
  AIORCH_PROVIDERS                      default priority order (default: openai,anthropic)
  AIORCH_TIMEOUT_MS                     per-call timeout (default 60000)
  AIORCH_POLICY, OPENAI_POLICY, ...     K=V,... policies for every provider, or for one
  AIORCH_LOG                            debug | info | warn (default) | error

exit status: 0 success (parallel: at least one answer), 1 failure, 2 usage error
]]

local function one_line(s)
  return (tostring(s):gsub("[\r\n]+", " "))
end

local function err_line(msg, ...)
  if select("#", ...) > 0 then
    msg = fmt(msg, ...)
  end
  io_stderr:write("aiorch: ", one_line(msg), "\n")
end

local function usage_error(msg, ...)
  if select("#", ...) > 0 then
    msg = fmt(msg, ...)
  end
  err_line("%s (try 'aiorch --help')", one_line(msg))
  return 2
end

local function version()
  local ok, core = pcall(require, "aiorch")
  return ok and type(core) == "table" and core.version or "0.1.0"
end

-- ask's options: name -> field, and whether it takes a value.
local ASK_OPTIONS = {
  ["--strategy"] = { "strategy", true },
  ["--providers"] = { "providers", true },
  ["--context"] = { "context", true },
  ["--system"] = { "system", true },
  ["--temperature"] = { "temperature", true },
  ["--max-tokens"] = { "max_tokens", true },
  ["--path"] = { "path", true },
  ["--json"] = { "json", false },
  ["--stream"] = { "stream", false },
  ["--policy"] = { "policy", true },
  ["--help"] = { "help", false },
  ["-h"] = { "help", false },
}

-- Returns the options table, or nil, message.
local function parse_ask(args, first)
  local o = { path = {}, words = {} }
  local i = first
  local only_words = false
  while i <= #args do
    local a = args[i]
    if only_words or a:sub(1, 1) ~= "-" or a == "-" then
      o.words[#o.words + 1] = a
    elseif a == "--" then
      only_words = true
    else
      local name, inline = a:match("^(%-%-[%w%-]+)=(.*)$")
      name = name or a
      local spec = ASK_OPTIONS[name]
      if not spec then
        return nil, fmt("ask: unknown option '%s'", name)
      end
      local field, takes = spec[1], spec[2]
      local value = true
      if takes then
        if inline then
          value = inline
        else
          i = i + 1
          value = args[i]
          if value == nil then
            return nil, fmt("ask: option %s needs a value", name)
          end
        end
      elseif inline then
        return nil, fmt("ask: option %s takes no value", name)
      end
      if field == "path" then
        o.path[#o.path + 1] = value
      else
        o[field] = value
      end
    end
    i = i + 1
  end
  return o
end

local function build_request(o)
  local req = { user_question = concat(o.words, " "), context = o.context, system_prompt = o.system }
  if o.temperature ~= nil then
    local t = tonumber(o.temperature)
    if not t then
      return nil, fmt("temperature: '%s' is not a number", o.temperature)
    end
    req.temperature = t
  end
  if o.max_tokens ~= nil then
    local n = tonumber(o.max_tokens)
    if not n then
      return nil, fmt("max_tokens: '%s' is not a number", o.max_tokens)
    end
    req.max_tokens = n
  end
  if o.policy ~= nil then
    local p, err = policy.parse(o.policy, "--policy")
    if not p then
      return nil, err
    end
    req.policy = p
  end
  return req
end

-- Streamed tokens go to stdout as they come: the orchestration passes on
-- only those of the provider that owns the stream (see aiorch.context).
local function token_printer()
  local state = { owner = nil }
  function state.on_token(text, provider)
    if state.owner == nil then
      state.owner = provider
    end
    io_stdout:write(text)
    io_stdout:flush()
  end
  return state
end

local function failure_line(r)
  local m = r.metadata or {}
  if m.error_kind == "all_failed" then
    return r.error_message
  end
  return fmt("%s: %s (%s)", tostring(r.ia_provider_name), m.error_kind or r.status,
    tostring(r.error_message or "failed"))
end

local function print_text(result, printer)
  if response.is_response(result) then
    if result.status ~= "success" then
      if printer and printer.owner then
        io_stdout:write("\n")
      end
      err_line(failure_line(result))
      return 1
    end
    local m = result.metadata or {}
    if printer and (printer.owner == result.ia_provider_name or m.continued_from == printer.owner) then
      if m.continued_from then
        err_line("note: the answer from %s was cut off; %s continued it", m.continued_from, result.ia_provider_name)
      end
      io_stdout:write("\n")
    else
      if printer and printer.owner then
        io_stdout:write("\n")
        err_line("note: the answer streamed from %s was cut off; the answer from %s follows",
          printer.owner, result.ia_provider_name)
      end
      io_stdout:write(result.response_text, "\n")
    end
    return 0
  end
  local ok, failures = false, {}
  for _, r in ipairs(result) do
    if r.status == "success" then
      ok = true
      if #result > 1 then
        io_stdout:write(fmt("== %s (%d ms) ==\n", tostring(r.ia_provider_name), r.latency_ms or 0))
      end
      io_stdout:write(r.response_text, "\n")
    else
      failures[#failures + 1] = failure_line(r)
    end
  end
  if #failures > 0 then -- one line, whatever the number of providers
    err_line("%s%s", ok and "" or "all providers failed: ", table.concat(failures, "; "))
  end
  return ok and 0 or 1
end

local function exit_code(result)
  if response.is_response(result) then
    return result.status == "success" and 0 or 1
  end
  for _, r in ipairs(result) do
    if r.status == "success" then
      return 0
    end
  end
  return 1
end

function _M.ask(args, first)
  local o, perr = parse_ask(args, first)
  if not o then
    return usage_error(perr)
  end
  if o.help then
    io_stdout:write(_M.usage)
    return 0
  end
  if #o.words == 0 then
    return usage_error("ask: missing QUESTION")
  end
  local req, rerr = build_request(o)
  if not req then
    return usage_error(rerr)
  end

  local strategy = o.strategy or orchestrate.default_strategy
  -- Parallel answers would interleave on stdout: they are printed whole.
  local printer = (o.stream and not o.json and strategy ~= "parallel") and token_printer() or nil
  local opts = {
    path = o.path,
    stream = o.stream and true or nil,
    on_token = printer and printer.on_token or nil,
  }
  local result, err, kind = orchestrate.orchestrate(req, strategy, o.providers, opts)
  if not result then
    if kind == "invalid" then
      return usage_error(err)
    end
    err_line(err)
    return 1
  end

  if o.json then
    io_stdout:write(response.encode(result), "\n")
    local code = exit_code(result)
    if code ~= 0 then
      if response.is_response(result) then
        err_line(failure_line(result))
      else
        err_line("every provider failed")
      end
    end
    return code
  end
  return print_text(result, printer)
end

local function traceback(e)
  if type(e) ~= "string" then
    e = tostring(e)
  end
  return { message = e, trace = debug.traceback(e, 2) }
end

-- run SCRIPT.lua [ARGS...]: the script runs in this task, with global arg.
function _M.run(args, first)
  local script = args[first]
  if not script then
    return usage_error("run: missing SCRIPT.lua")
  end
  local chunk, lerr = loadfile(script)
  if not chunk then
    err_line("run: %s", lerr)
    return 1
  end
  local sargs = { [0] = script }
  for i = first + 1, #args do
    sargs[#sargs + 1] = args[i]
  end
  rawset(_G, "arg", sargs)
  local res = table.pack(xpcall(chunk, traceback, unpack(sargs, 1, #sargs)))
  if not res[1] then
    local e = res[2]
    err_line(e.message)
    if os.getenv("AIORCH_LOG") == "debug" then
      io_stderr:write(e.trace, "\n")
    end
    return 1
  end
  local r = res[2]
  if type(r) == "number" then
    return math.tointeger(r) or 1
  elseif r == false then
    return 1
  end
  return 0
end

-- serve [--listen HOST:PORT] [--config FILE] [--path DIR]: runs the gateway
-- until the process is stopped (or the handle is drained by a signal hook).
function _M.serve(args, first)
  local o = { path = {} }
  local i = first
  while i <= #args do
    local a = args[i]
    local name, inline = a:match("^(%-%-[%w%-]+)=(.*)$")
    name = name or a
    if name == "--help" or name == "-h" then
      io_stdout:write(_M.usage)
      return 0
    end
    local field = ({ ["--listen"] = "listen", ["--config"] = "config", ["--path"] = "path",
      ["--workers"] = "workers" })[name]
    if name == "--worker" and not inline then
      o.worker = true -- hidden: one worker under the master (gateway/master.lua)
      field = false
    end
    if field == nil then
      return usage_error("serve: unknown argument '%s'", a)
    end
    local value = inline
    if value == nil and field then
      i = i + 1
      value = args[i]
      if value == nil then
        return usage_error("serve: option %s needs a value", name)
      end
    end
    if field == "path" then
      o.path[#o.path + 1] = value
    elseif field then -- (a flag has none)
      o[field] = value
    end
    i = i + 1
  end
  local master = require "aiorch.gateway.master"
  local workers
  if o.workers then
    workers = math.tointeger(tonumber(o.workers))
    if not workers or workers < 0 then
      return usage_error("serve: --workers needs a number >= 0")
    end
  end
  local gconfig = require "aiorch.gateway.config"
  local gateway = require "aiorch.gateway.server"
  local host, port
  if o.listen then
    host, port = gconfig.parse_listen(o.listen)
    if not host then
      return usage_error("serve: %s", port)
    end
  end
  local path = #o.path > 0 and o.path or nil
  local cfg, cerr
  if o.config then
    cfg, cerr = gconfig.load(o.config, nil, path)
  else
    cfg, cerr = gconfig.default(nil, path)
  end
  if not cfg then
    err_line("serve: %s", cerr)
    return o.config and 1 or 2
  end
  if not o.worker and workers ~= 0 then
    -- The master: the workers run this same command with --worker.
    if (port or cfg.port) == 0 then
      return usage_error("serve: workers share a fixed port: give one, or --workers 0")
    end
    local argv = { require("aiorch").process.exe() or "aiorch", "serve", "--worker" }
    local j = first
    while j <= #args do
      if args[j] == "--workers" then
        j = j + 1
      elseif not args[j]:match("^%-%-workers=") then
        argv[#argv + 1] = args[j]
      end
      j = j + 1
    end
    return master.run { argv = argv, workers = workers, drain_timeout_ms = cfg.drain_timeout_ms }
  end
  -- The descriptors limit is raised to fit server.max_connections (or the
  -- limit lowered to fit it); a worker shares the port with the others.
  local server = { raise_nofile = true }
  for k, v in pairs(cfg.server) do
    server[k] = v
  end
  server.reuseport = o.worker and true or server.reuseport
  cfg.server = server
  local h, herr = gateway.start { config = cfg, host = host, port = port, path = path }
  if not h then
    err_line("serve: %s", herr)
    return 1
  end
  _M.gateway = h -- the hook for signal handling (drain on SIGTERM)
  err_line("listening on http://%s:%d", h.host, h.port)
  io_stderr:flush()
  -- SIGTERM drains and returns 0; SIGHUP is the master's business.
  return master.worker(h, { drain_timeout_ms = cfg.drain_timeout_ms })
end

function _M.main(args)
  args = args or {}
  local cmd = args[1]
  if cmd == nil then
    io_stderr:write(_M.usage)
    return 2
  end
  if cmd == "--help" or cmd == "-h" or cmd == "help" then
    io_stdout:write(_M.usage)
    return 0
  elseif cmd == "--version" or cmd == "version" then
    io_stdout:write("aiorch ", version(), "\n")
    return 0
  elseif cmd == "ask" then
    return _M.ask(args, 2)
  elseif cmd == "run" then
    return _M.run(args, 2)
  elseif cmd == "serve" then
    return _M.serve(args, 2)
  elseif cmd == "demo" then
    local demo = require "aiorch.demo"
    return demo.main({ unpack(args, 2) })
  end
  return usage_error("unknown command '%s'", cmd)
end

return _M
