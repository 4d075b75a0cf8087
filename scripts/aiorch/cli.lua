-- The `aiorch` command: main(args) -> exit status.
-- 0 success (parallel: at least one provider answered), 1 failure, 2 usage.
local core = require "aiorch"
local orchestrate = require "aiorch.orchestrate"
local response = require "aiorch.response"
local policy = require "aiorch.policy"
local trace = require "aiorch.trace"

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
usage: aiorch [--debug] <command> [options]

commands:
  ask [options] QUESTION     ask the providers and print the answer
  run [--debug] SCRIPT.lua [ARGS...]
                             run a Lua script inside the runtime (as the main task)
  demo                       run every strategy against built-in mock providers (no keys needed)
  serve [options]            run the gateway (OpenAI- and Anthropic-compatible HTTP API)
  help, --help               show this help (also: COMMAND --help)
  --version                  show the version

ask options:
  --strategy S        single | parallel | fallback (default) | fastest | hedged | thrifty | a user
                      strategy, or a balancer over deployments: weighted | least_busy |
                      least_latency | headroom | sticky | cheapest; or quorum | first_k |
                      arrived_by (parallel, policy parallel_k / arrived_by_ms)
  --providers a,b     providers in priority order (default: every available one)
  --context TEXT      context for the question
  --system TEXT       system prompt (default: built from the context)
  --temperature T     sampling temperature, within every chosen provider's range
  --max-tokens N      at most N tokens in the answer
  --json              print the StandardAIResponse (a JSON array for parallel)
  --stream            print the answer as it arrives (single, fallback, fastest, hedged)
  --policy K=V,...    this request's retries, deadlines and streaming policy, e.g.
                      max_attempts=3,first_token_timeout_ms=5000,continue_on_cut=true
  --path DIR          a user directory searched first for strategies/, providers/ and
                      prompts/ (repeatable; AIORCH_PATH holds more, ':'-separated)
  --config FILE       the providers of a gateway configuration (serve's --config), those
                      it declares included
  --debug             print the traceback of an error in a script or strategy (also for
                      run and serve, or before the command; or AIORCH_DEBUG=1)

serve options:
  --listen HOST:PORT  address to listen on (default 127.0.0.1:8080, or the config's)
  --config FILE       the gateway's Lua configuration (providers, aliases, client keys)
  --path DIR          as for ask
  --workers N         worker processes sharing the port, under a master that restarts them
                      (default: the number of cores; 0: serve from this one process)
  --debug             as for ask
  endpoints: POST /v1/chat/completions, POST /v1/messages, POST /v1/orchestrate,
             POST /v1beta/models/MODEL:generateContent (and :streamGenerateContent),
             GET /v1/models, GET /v1beta/models, GET /healthz, GET /metrics

environment:
  OPENAI_API_KEY, ANTHROPIC_API_KEY     a provider is available when its key is set
  GEMINI_API_KEY (or GOOGLE_API_KEY)    (gemini's)
  OPENAI_BASE_URL, ANTHROPIC_BASE_URL   point a provider at a compatible server
  GEMINI_BASE_URL                       (gemini's)
  OPENAI_MODEL, ANTHROPIC_MODEL         use another model
  CO_API_KEY, CO_API_URL, COHERE_MODEL  the cohere provider (not in the default order)
  GEMINI_MODEL                          (gemini's)
  AZURE_OPENAI_API_KEY, AZURE_OPENAI_ENDPOINT, OPENAI_API_VERSION, AZURE_OPENAI_DEPLOYMENT
                                        the azure provider (not in the default order)
  GROQ_API_KEY, MISTRAL_API_KEY, DEEPSEEK_API_KEY, OPENROUTER_API_KEY, TOGETHER_API_KEY, XAI_API_KEY
                                        the presets of OpenAI-compatible servers (ollama, vllm and
                                        lmstudio need no key); NAME_BASE_URL, NAME_MODEL move one
  AIORCH_PROVIDERS                      default priority order (default: openai,anthropic)
  AIORCH_TIMEOUT_MS                     per-call timeout (default 60000)
  AIORCH_POLICY, OPENAI_POLICY, ...     K=V,... policies for every provider, or for one
  AIORCH_PATH                           user directories searched first, ':'-separated
  AIORCH_LOG                            debug | info | warn (default) | error
  AIORCH_DEBUG                          1: tracebacks, as --debug
  AIORCH_INSTRUCTION_BUDGET             Lua instructions a task may run without yielding
                                        (default 100000000)
  AIORCH_ROOT                           the directory holding aiorch's scripts/ and strategies/
                                        (default: found beside the installed program, e.g.
                                        PREFIX/bin/aiorch -> PREFIX/share/aiorch)

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
  return core.version or "0.1.0"
end

-- A command's options: name -> field, and whether it takes a value;
-- every command takes --debug and --help (-h).
local function options(own)
  own["--debug"] = { "debug", false }
  own["--help"] = { "help", false }
  own["-h"] = { "help", false }
  return own
end

local ASK_OPTIONS = options {
  ["--strategy"] = { "strategy", true },
  ["--providers"] = { "providers", true },
  ["--context"] = { "context", true },
  ["--system"] = { "system", true },
  ["--temperature"] = { "temperature", true },
  ["--max-tokens"] = { "max_tokens", true },
  ["--path"] = { "path", true },
  ["--config"] = { "config", true },
  ["--json"] = { "json", false },
  ["--stream"] = { "stream", false },
  ["--policy"] = { "policy", true },
}

-- serve's options; the hidden --worker (one worker under the master,
-- gateway/master.lua) is not among them.
local SERVE_OPTIONS = options {
  ["--listen"] = { "listen", true },
  ["--config"] = { "config", true },
  ["--path"] = { "path", true },
  ["--workers"] = { "workers", true },
}

-- run's options, before SCRIPT.lua (what follows it is the script's).
local RUN_OPTIONS = options {}

-- demo's: it takes no others.
local DEMO_OPTIONS = options {}

_M.options = { ask = ASK_OPTIONS, serve = SERVE_OPTIONS, run = RUN_OPTIONS, demo = DEMO_OPTIONS }

-- Why dir is no directory, or nil when it is one.
local function not_a_dir(dir)
  if io.open(dir .. "/", "r") then
    return nil
  end
  return io.open(dir, "r") and "not a directory" or "no such directory"
end

-- Parses the options of cmd from args[first]; the other words go to
-- o.words. stop_at_word: the first word ends the options (run's script).
-- Returns o, or nil, message.
local function parse(cmd, spec, args, first, stop_at_word)
  local o = { path = {}, words = {} }
  local i = first
  local only_words = false
  while i <= #args do
    local a = args[i]
    if only_words or a:sub(1, 1) ~= "-" or a == "-" then
      o.words[#o.words + 1] = a
      only_words = only_words or stop_at_word
    elseif a == "--" then
      only_words = true
    else
      local name, inline = a:match("^(%-%-[%w%-]+)=(.*)$")
      name = name or a
      local opt = spec[name]
      if not opt then
        return nil, fmt("%s: unknown option '%s'", cmd, name)
      end
      local field, takes = opt[1], opt[2]
      local value = true
      if takes then
        if inline then
          value = inline
        else
          i = i + 1
          value = args[i]
          if value == nil then
            return nil, fmt("%s: option %s needs a value", cmd, name)
          end
        end
      elseif inline then
        return nil, fmt("%s: option %s takes no value", cmd, name)
      end
      if field == "path" then
        local why = not_a_dir(value)
        if why then
          return nil, fmt("%s: --path '%s': %s", cmd, value, why)
        end
        o.path[#o.path + 1] = value
      else
        o[field] = value
      end
    end
    i = i + 1
  end
  if o.debug then
    trace.debug(true)
  end
  return o
end

-- A command's options, or nil and its exit code when that is all it does:
-- a usage error (2), or --help written (0).
local function command_options(name, spec, args, first, stop_at_word)
  local o, perr = parse(name, spec, args, first, stop_at_word)
  if not o then
    return nil, usage_error(perr)
  end
  if o.help then
    io_stdout:write(_M.usage)
    return nil, 0
  end
  return o
end

-- The options that are numbers on the request.
local NUMBER_OPTIONS = { "temperature", "max_tokens" }

local function build_request(o)
  local req = { user_question = concat(o.words, " "), context = o.context, system_prompt = o.system }
  for _, f in ipairs(NUMBER_OPTIONS) do
    local v = o[f]
    if v ~= nil then
      local n = tonumber(v)
      if not n then
        return nil, fmt("%s: '%s' is not a number", f, v)
      end
      req[f] = n
    end
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
  -- Every provider's failure is in the message; a strategy's names no provider.
  if m.error_kind == "all_failed" or r.ia_provider_name == nil then
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

-- orchestrate in a task of its own: a strategy that runs away is stopped
-- by the instruction budget, past any pcall; that ends this task only, and
-- the failure is reported as the strategy's.
local function run_orchestration(req, strategy, providers, opts)
  local t = core.spawn(orchestrate.orchestrate, req, strategy, providers, opts)
  local r, kind, err = t:await()
  if r == nil and kind == "error" then
    return response.error(nil, "strategy", fmt("strategy '%s' failed: %s", strategy, err), 0, {})
  end
  return r, kind, err
end

function _M.ask(args, first)
  local o, done = command_options("ask", ASK_OPTIONS, args, first)
  if not o then
    return done
  end
  if #o.words == 0 then
    return usage_error("ask: missing QUESTION")
  end
  -- An empty list would silently mean "the default ones".
  if o.providers ~= nil and not o.providers:find("[^,%s]") then
    return usage_error("ask: --providers needs at least one provider name")
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
  if o.config then
    -- The configuration's providers, keys and models, as serve has them.
    local cfg, cerr = require("aiorch.gateway.config").load(o.config, nil, #o.path > 0 and o.path or nil)
    if not cfg then
      err_line("ask: %s", cerr)
      return 1
    end
    opts.env = require("aiorch.gateway.config").env_for(cfg, nil)
  end
  local result, kind, err = run_orchestration(req, strategy, o.providers, opts)
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

-- run [--debug] SCRIPT.lua [ARGS...]: the script runs in this task, with
-- global arg. An error is one line naming the script's file and line; its
-- traceback comes in debug mode only.
function _M.run(args, first)
  local o, done = command_options("run", RUN_OPTIONS, args, first, true)
  if not o then
    return done
  end
  local script = o.words[1]
  if not script then
    return usage_error("run: missing SCRIPT.lua")
  end
  local chunk, lerr = loadfile(script)
  if not chunk then
    err_line("run: %s", lerr)
    return 1
  end
  local sargs = { [0] = script, unpack(o.words, 2) }
  rawset(_G, "arg", sargs)
  local res = table.pack(xpcall(chunk, trace.handler, unpack(sargs, 1, #sargs)))
  if not res[1] then
    local e = res[2]
    trace.report(e)
    err_line(type(e) == "table" and e.message or tostring(e))
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
  -- --worker: one worker under the master (gateway/master.lua), hidden.
  local worker = args[first] == "--worker"
  -- --debug reaches the workers too: they run these arguments.
  local o, done = command_options("serve", SERVE_OPTIONS, args, worker and first + 1 or first)
  if not o then
    return done
  end
  if #o.words > 0 then
    return usage_error("serve: unknown argument '%s'", o.words[1])
  end
  o.worker = worker
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
  if workers == nil then
    workers = cfg.workers -- the configuration's, when the command line gives none
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
    -- The workers' shared state (limits, breakers, counters) is made here,
    -- before any of them, and lives as long as they do.
    local dict, derr = require("aiorch.state.shm").create(cfg.shared_memory)
    if not dict then
      err_line("serve: %s", derr)
      return 1
    end
    return master.run { argv = argv, workers = workers, drain_timeout_ms = cfg.drain_timeout_ms, shm = dict }
  end
  if o.worker then
    -- A worker of a master: its state is the master's segment (none when
    -- started by hand).
    local backend, berr = require("aiorch.state.shm").from_env()
    if berr then
      err_line("serve: %s", berr)
      return 1
    end
    if backend then
      require("aiorch.state").use(backend)
    end
  end
  if cfg.redis then
    -- Replicas share their windows and breakers through Redis (docs/replicas.md).
    local tier, rerr = require("aiorch.state.redis").new(cfg.redis)
    if not tier then
      err_line("serve: %s", rerr)
      return 1
    end
    require("aiorch.state").share(tier)
    tier:warm()
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
  -- aiorch --debug CMD ... is CMD --debug ...: each command takes it.
  if args[1] == "--debug" and args[2] then
    table.remove(args, 1)
    table.insert(args, 2, "--debug")
  end
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
    local o, done = command_options("demo", DEMO_OPTIONS, args, 2)
    if not o then
      return done
    elseif #o.words > 0 then
      return usage_error("demo: unknown argument '%s'", o.words[1])
    end
    return require("aiorch.demo").main()
  end
  return usage_error("unknown command '%s'", cmd)
end

return _M
