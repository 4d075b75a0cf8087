-- The gateway's configuration: a Lua file (`--config FILE`) returning a
-- table, checked once at load. Keys come only from environment variables
-- named in it; a literal key is refused so that it never lands in a
-- committed file. The result also answers "which strategy, providers and
-- env for this request" (route()).
local loader = require "aiorch.loader"
local compat = require "aiorch.compat"
local policy = require "aiorch.policy"
local secrets = require "aiorch.secrets"
local state_shm = require "aiorch.state.shm"
local state_redis = require "aiorch.state.redis"
local cost = require "aiorch.cost"
local response_cache = require "aiorch.gateway.cache"

local fmt = string.format
local type = type
local pairs = pairs
local ipairs = ipairs
local tostring = tostring
local tonumber = tonumber
local next = next
local load = load
local pcall = pcall
local tointeger = math.tointeger
local sort = table.sort
local unpack = table.unpack
local concat = table.concat
local os_getenv = os.getenv
local io_open = io.open

local _M = {}

_M.default_listen = "127.0.0.1:8080"
_M.default_max_body = 1024 * 1024
_M.default_drain_timeout_ms = 10000
-- The whole of one request, strategy and every attempt included. The
-- official SDKs give up after 10 minutes; an attempt's own default is 60 s.
_M.default_request_timeout_ms = 300000
_M.max_request_timeout_ms = 24 * 3600 * 1000
-- The strategies that come with aiorch: clients may choose them unless the
-- configuration lists its own.
_M.builtin_strategies = { "fallback", "fastest", "hedged", "parallel", "single" }

local TOP = {
  listen = true, max_body = true, default_strategy = true, default_providers = true, providers = true,
  aliases = true, client_keys_env = true, drain_timeout_ms = true, access_log = true, server = true,
  policy = true, max_inflight = true, log_bodies = true, request_timeout_ms = true, client_policy = true,
  strategies = true, clients = true, drop_unsupported = true, rate_limit = true, shared_memory = true,
  redis = true, prices = true, budgets = true, workers = true, cache = true,
}
local PROVIDER = {
  api_key_env = true, base_url = true, model = true, models = true, model_prefixes = true, timeout_ms = true,
  priority = true, api_key = true, key = true, policy = true,
  -- aiorch.compat's: an OpenAI-compatible provider declared here.
  api = true, preset = true, quirks = true, deployments = true, api_version = true,
  balancer = true, -- (balance) the strategy that picks among its deployments
}
local ALIAS = { strategy = true, providers = true, cache = true }
local CLIENT = { key_env = true, strategies = true, providers = true, client_policy = true, request_timeout_ms = true,
  rate_limit = true, cache = true }

local function env_name_ok(s)
  return type(s) == "string" and s:match("^[%a_][%w_]*$") ~= nil
end

local function positive_int(v)
  local n = type(v) == "number" and tointeger(v) or nil
  return n and n > 0 and n or nil
end

-- "HOST:PORT" -> host, port or nil, message. Only IPv4 literals and names.
function _M.parse_listen(s)
  if type(s) ~= "string" then
    return nil, "listen: must be a string HOST:PORT"
  end
  local host, port = s:match("^([^:]*):(%d+)$")
  port = tointeger(tonumber(port or ""))
  if not host or not port or port > 65535 then
    return nil, fmt("listen: '%s' is not HOST:PORT", s)
  end
  if host == "" then
    host = "127.0.0.1"
  end
  return host, port
end

local function sorted_keys(t)
  local out = {}
  for k in pairs(t) do
    out[#out + 1] = k
  end
  sort(out, function(a, b) return tostring(a) < tostring(b) end)
  return out
end

local function check_keys(t, known, where)
  for _, k in ipairs(sorted_keys(t)) do
    if not known[k] then
      return nil, fmt("%s: unknown field '%s'", where, tostring(k))
    end
  end
  return true
end

local function string_list(v, where)
  if type(v) == "string" then
    local out = {}
    for n in v:gmatch("[^,%s]+") do
      out[#out + 1] = n
    end
    return out
  end
  if type(v) ~= "table" then
    return nil, fmt("%s: must be a list of strings", where)
  end
  for i, s in ipairs(v) do
    if type(s) ~= "string" or s == "" then
      return nil, fmt("%s[%d]: must be a non-empty string", where, i)
    end
  end
  return v
end

-- A strategy or provider name clients may send: letters, digits, _ and -.
local function name_ok(s)
  return type(s) == "string" and s:match("^[%w_%-]+$") ~= nil
end
_M.name_ok = name_ok

-- A list of names of strategies (kind "strategy") or providers that
-- exist -> a set and the sorted list, or nil, message.
local function name_set(kind, list, where, path)
  local set, names = {}, {}
  for i, n in ipairs(list) do
    if not name_ok(n) then
      return nil, fmt("%s[%d]: '%s' is not a %s name (letters, digits, '_' and '-')", where, i, tostring(n), kind)
    end
    local v, err = loader.load(kind, n, path)
    if not v then
      return nil, fmt("%s[%d]: %s", where, i, err)
    end
    if not set[n] then
      set[n] = true
      names[#names + 1] = n
    end
  end
  sort(names)
  return set, names
end

-- A client's lists of names it may use: field, and the kind of the names.
local CLIENT_NAMES = { { "strategies", "strategy" }, { "providers", "provider" } }

-- client_policy = {field = {least, most}, ...}: the policy fields clients
-- may set (X-Aiorch-Policy, a request's policy), each clamped to its
-- bounds, which must lie within the field's own range. Absent: none.
local function check_client_policy(v, where)
  if type(v) ~= "table" then
    return nil, where .. ": must be a table {field = {least, most}, ...}"
  end
  local out = {}
  for _, k in ipairs(sorted_keys(v)) do
    local b = v[k]
    local f = type(k) == "string" and policy.fields[k]
    if not f then
      return nil, fmt("%s: unknown policy field '%s'", where, tostring(k))
    end
    if policy.PROVIDER_ONLY[k] then
      return nil, fmt("%s.%s: set per provider only; clients may never set it", where, k)
    end
    if f[3] == "bool" then
      if b ~= true then
        return nil, fmt("%s.%s: must be true (clients may set it)", where, k)
      end
      out[k] = true
    else
      if type(b) ~= "table" or #b ~= 2 then
        return nil, fmt("%s.%s: must be {least, most}", where, k)
      end
      for i = 1, 2 do
        local _, err = policy.check_value(k, b[i], where)
        if err then
          return nil, err
        end
      end
      if b[1] > b[2] then
        return nil, fmt("%s.%s: least %s is above most %s", where, k, tostring(b[1]), tostring(b[2]))
      end
      out[k] = { b[1], b[2] }
    end
  end
  return out
end

local function request_timeout(v, where)
  local n = type(v) == "number" and tointeger(v) or nil
  if not n or n < 1 or n > _M.max_request_timeout_ms then
    return nil, fmt("%s: must be an integer from 1 to %d (ms)", where, _M.max_request_timeout_ms)
  end
  return n
end

-- rate_limit = {requests = N, per = "second" | "minute" | "hour"} ->
-- {requests, per, window_ms}, or nil, message.
local WINDOWS = { second = 1000, minute = 60000, hour = 3600000 }
_M.rate_windows = WINDOWS
local function check_rate_limit(v, where)
  if type(v) ~= "table" then
    return nil, where .. ': must be a table {requests = N, per = "second" | "minute" | "hour"}'
  end
  local ok, err = check_keys(v, { requests = true, per = true }, where)
  if not ok then
    return nil, err
  end
  local n = positive_int(v.requests)
  if not n or n > 1000000000 then
    return nil, where .. ".requests: must be an integer from 1 to 1000000000"
  end
  if not WINDOWS[v.per] then
    return nil, where .. '.per: must be "second", "minute" or "hour"'
  end
  return { requests = n, per = v.per, window_ms = WINDOWS[v.per] }
end

-- "provider" or "provider:model" -> name, model|nil
local function split_pair(s)
  local name, model = s:match("^([%w_%-]+):(.+)$")
  if name then
    return name, model
  end
  return s, nil
end

-- Checks a raw config table. getenv(name) reads the environment.
-- Returns the config or nil, message.
function _M.check(raw, getenv, path)
  getenv = getenv or os_getenv
  if type(raw) ~= "table" then
    return nil, "config: must return a table"
  end
  local ok, err = check_keys(raw, TOP, "config")
  if not ok then
    return nil, err
  end
  local c = {
    listen = raw.listen or _M.default_listen,
    max_body = raw.max_body or _M.default_max_body,
    default_strategy = raw.default_strategy or "fallback",
    drain_timeout_ms = raw.drain_timeout_ms or _M.default_drain_timeout_ms,
    max_inflight = raw.max_inflight or 0,
    shared_memory = state_shm.default_size, -- bytes the master shares with its workers
    access_log = raw.access_log ~= false,
    log_bodies = raw.log_bodies,
    server = raw.server or {},
    providers = {}, -- name -> {model, models, ...}
    order = {}, -- provider names in priority order (configured ones)
    aliases = {},
    client_keys = nil,
    path = path,
    policy = nil, -- every provider's, under its own
    request_timeout_ms = _M.default_request_timeout_ms,
    client_policy = nil, -- {field = {least, most}}: what clients may override; nil: nothing
    strategies = nil, -- the set clients may choose, and its sorted list (strategy_names)
    strategy_names = nil,
    clients = nil, -- the list of client entries, one per key, in key order
  }
  if raw.drop_unsupported ~= nil then
    -- The fields a provider that cannot take them may go without (the
    -- answer then says so: X-Aiorch-Dropped, metadata.dropped).
    local list, lerr = string_list(raw.drop_unsupported, "drop_unsupported")
    if not list then
      return nil, lerr
    end
    c.drop_unsupported = list
  end
  if raw.request_timeout_ms ~= nil then
    local n, terr = request_timeout(raw.request_timeout_ms, "request_timeout_ms")
    if not n then
      return nil, terr
    end
    c.request_timeout_ms = n
  end
  if raw.client_policy ~= nil then
    local cp, cperr = check_client_policy(raw.client_policy, "client_policy")
    if not cp then
      return nil, cperr
    end
    c.client_policy = cp
  end
  if raw.policy ~= nil then
    local pol, perr = policy.check(raw.policy, "policy", true)
    if not pol then
      return nil, perr
    end
    c.policy = pol
  end
  local host, port = _M.parse_listen(c.listen)
  if not host then
    return nil, port
  end
  c.host, c.port = host, port
  if not positive_int(c.max_body) then
    return nil, "max_body: must be a positive integer (bytes)"
  end
  if not positive_int(c.drain_timeout_ms) then
    return nil, "drain_timeout_ms: must be a positive integer"
  end
  if c.log_bodies ~= nil and type(c.log_bodies) ~= "boolean" then
    return nil, "log_bodies: must be true or false"
  end
  if c.max_inflight ~= 0 and not positive_int(c.max_inflight) then
    return nil, "max_inflight: must be a positive integer (requests at once, all workers together), or 0 for no limit"
  end
  if raw.rate_limit ~= nil then
    local rl, rerr = check_rate_limit(raw.rate_limit, "rate_limit")
    if not rl then
      return nil, rerr
    end
    c.rate_limit = rl
  end
  if raw.shared_memory ~= nil then
    local size, serr2 = state_shm.parse_size(raw.shared_memory, "shared_memory")
    if not size then
      return nil, serr2
    end
    c.shared_memory = size
  end
  if raw.redis ~= nil then -- replicas sharing limits and breakers (docs/replicas.md)
    local rc, rerr = state_redis.check(raw.redis, getenv, "redis")
    if not rc then
      return nil, rerr
    end
    c.redis = rc
  end
  if raw.cache ~= nil and raw.cache ~= false then -- the response cache (aiorch.gateway.cache)
    local cc, cerr = response_cache.check(raw.cache, "cache")
    if not cc then
      return nil, cerr
    end
    c.cache = cc
  end
  if type(c.server) ~= "table" then
    return nil, "server: must be a table of aiorch.server.listen options"
  end
  for _, k in ipairs({ "host", "port", "handler", "max_body", "on_refuse", "on_headers" }) do
    if c.server[k] ~= nil then
      return nil, fmt("server.%s: set by the gateway (use listen or max_body)", k)
    end
  end
  if type(c.default_strategy) ~= "string" then
    return nil, "default_strategy: must be a string"
  end
  local default_s, serr = loader.load("strategy", c.default_strategy, path)
  if not default_s then
    return nil, "default_strategy: " .. serr
  end

  local providers = raw.providers or {}
  if type(providers) ~= "table" then
    return nil, "providers: must be a table {name = {...}}"
  end
  local prio = {}
  for _, name in ipairs(sorted_keys(providers)) do
    local p = providers[name]
    local where = "providers." .. tostring(name)
    if type(name) ~= "string" or type(p) ~= "table" then
      return nil, where .. ": must be a table"
    end
    ok, err = check_keys(p, PROVIDER, where)
    if not ok then
      return nil, err
    end
    if p.api_key ~= nil or p.key ~= nil then
      return nil, where .. ": literal keys are refused; name the environment variable with api_key_env"
    end
    -- (balance) deployments as a list: the provider's keys, base URLs or
    -- regions (as a map {model = deployment}: Azure's deployment names).
    local balanced, balancer
    if type(p.deployments) == "table" and p.deployments[1] ~= nil then
      local derr
      balanced, derr = require("aiorch.deployments").check(p.deployments, where .. ".deployments")
      if not balanced then
        return nil, derr
      end
      balancer = p.balancer or "weighted"
      if type(balancer) ~= "string" then
        return nil, where .. ".balancer: must be a strategy name"
      end
      local s, berr = loader.load("strategy", balancer, path)
      if not s then
        return nil, where .. ".balancer: " .. berr
      end
      local rest = {}
      for k, v in pairs(p) do
        rest[k] = v
      end
      rest.deployments, rest.balancer = nil, nil
      p = rest
    elseif p.balancer ~= nil then
      return nil, where .. ".balancer: needs deployments (a list)"
    end
    local adapter, aerr
    if compat.declares(p) then
      -- No adapter file: aiorch.compat's, found by the entry's name from now on.
      adapter, aerr = compat.entry_adapter(name, p, where)
      if not adapter then
        return nil, aerr
      end
      loader.define("provider", name, adapter)
    else
      adapter, aerr = loader.load("provider", name, path)
      if not adapter then
        return nil, where .. ": " .. aerr
      end
    end
    if p.api_key_env ~= nil and p.api_key_env ~= false and not env_name_ok(p.api_key_env) then
      return nil, where .. ".api_key_env: must be an environment variable name (a literal key is refused)"
    end
    if p.base_url ~= nil and (type(p.base_url) ~= "string" or not p.base_url:match("^https?://")) then
      return nil, where .. ".base_url: must be an http(s) URL"
    end
    if p.model ~= nil and type(p.model) ~= "string" then
      return nil, where .. ".model: must be a string"
    end
    if p.timeout_ms ~= nil and not positive_int(p.timeout_ms) then
      return nil, where .. ".timeout_ms: must be a positive integer"
    end
    local pol, polerr = policy.check(p.policy, where .. ".policy", true)
    if not pol then
      return nil, polerr
    end
    if p.priority ~= nil and type(p.priority) ~= "number" then
      return nil, where .. ".priority: must be a number"
    end
    local models = adapter.models or {} -- Azure's: its deployments' models
    if p.models ~= nil then
      local list, lerr = string_list(p.models, where .. ".models")
      if not list then
        return nil, lerr
      end
      models = list
    end
    local prefixes
    if p.model_prefixes ~= nil then
      local list, lerr = string_list(p.model_prefixes, where .. ".model_prefixes")
      if not list then
        return nil, lerr
      end
      prefixes = list
    end
    local model = p.model or adapter.default_model
    c.providers[name] = {
      name = name, adapter = adapter, model = model, models = models, model_prefixes = prefixes, base_url = p.base_url,
      timeout_ms = p.timeout_ms, key_env = p.api_key_env or nil, policy = p.policy and pol or nil,
      deployments = balanced, balancer = balancer,
    }
    prio[#prio + 1] = { name = name, priority = p.priority or 1000 }
  end
  sort(prio, function(a, b)
    if a.priority ~= b.priority then
      return a.priority < b.priority
    end
    return a.name < b.name
  end)
  for i, e in ipairs(prio) do
    c.order[i] = e.name
  end

  if raw.default_providers ~= nil then
    local list, lerr = string_list(raw.default_providers, "default_providers")
    if not list then
      return nil, lerr
    end
    for _, n in ipairs(list) do
      local a, aerr = loader.load("provider", n, path)
      if not a then
        return nil, "default_providers: " .. aerr
      end
    end
    c.default_providers = list
  end

  local aliases = raw.aliases or {}
  if type(aliases) ~= "table" then
    return nil, "aliases: must be a table {model_name = {strategy = ..., providers = {...}}}"
  end
  for _, name in ipairs(sorted_keys(aliases)) do
    local a = aliases[name]
    local where = fmt("aliases[%q]", tostring(name))
    if type(name) ~= "string" or type(a) ~= "table" then
      return nil, where .. ": must be a table"
    end
    ok, err = check_keys(a, ALIAS, where)
    if not ok then
      return nil, err
    end
    local strategy = a.strategy or c.default_strategy
    local s, e2 = loader.load("strategy", strategy, path)
    if not s then
      return nil, where .. ".strategy: " .. e2
    end
    local list, lerr = string_list(a.providers or {}, where .. ".providers")
    if not list then
      return nil, lerr
    end
    local names, models = {}, {}
    for _, pair in ipairs(list) do
      local pname, pmodel = split_pair(pair)
      local ad, aerr = loader.load("provider", pname, path)
      if not ad then
        return nil, where .. ".providers: " .. aerr
      end
      names[#names + 1] = pname
      models[pname] = pmodel
    end
    if a.cache ~= nil and type(a.cache) ~= "boolean" then -- this model's answers cached or not
      return nil, where .. ".cache: must be true or false"
    end
    c.aliases[name] = { strategy = strategy, providers = #names > 0 and names or nil, models = models, cache = a.cache }
  end

  -- The strategies clients may choose: as listed, else the built-ins plus
  -- every strategy the configuration names.
  local allowed = raw.strategies
  if allowed == nil then
    allowed = {}
    for _, n in ipairs(_M.builtin_strategies) do
      allowed[#allowed + 1] = n
    end
    allowed[#allowed + 1] = c.default_strategy
    for _, a in pairs(c.aliases) do
      allowed[#allowed + 1] = a.strategy
    end
  else
    local list, lerr = string_list(allowed, "strategies")
    if not list then
      return nil, lerr
    end
    allowed = list
  end
  local sset, snames = name_set("strategy", allowed, "strategies", path)
  if not sset then
    return nil, snames
  end
  c.strategies, c.strategy_names = sset, snames

  local clients = {}
  local keys = {}
  if raw.client_keys_env ~= nil then
    local list, lerr = string_list(raw.client_keys_env, "client_keys_env")
    if not list then
      return nil, lerr
    end
    for _, n in ipairs(list) do
      if not env_name_ok(n) then
        return nil, "client_keys_env: must name environment variables (a literal key is refused)"
      end
      local v = getenv(n)
      if type(v) ~= "string" or v == "" then
        -- Starting without the keys would silently turn auth off.
        return nil, fmt("client_keys_env: %s is not set", n)
      end
      keys[#keys + 1] = v
      clients[#clients + 1] = { name = n, key = v }
    end
  end
  -- clients = {NAME = {key_env, strategies, providers, client_policy,
  -- request_timeout_ms}}: a key each, with what it may do.
  if raw.clients ~= nil then
    if type(raw.clients) ~= "table" then
      return nil, "clients: must be a table {name = {key_env = ..., ...}}"
    end
    for _, name in ipairs(sorted_keys(raw.clients)) do
      local e = raw.clients[name]
      local where = "clients." .. tostring(name)
      if not name_ok(name) or type(e) ~= "table" then
        return nil, where .. ": must be a table, under a name of letters, digits, '_' and '-'"
      end
      ok, err = check_keys(e, CLIENT, where)
      if not ok then
        return nil, err
      end
      if not env_name_ok(e.key_env) then
        return nil, where .. ".key_env: must name an environment variable (a literal key is refused)"
      end
      local v = getenv(e.key_env)
      if type(v) ~= "string" or v == "" then
        return nil, fmt("%s.key_env: %s is not set", where, e.key_env)
      end
      local entry = { name = name, key = v }
      for _, f in ipairs(CLIENT_NAMES) do
        local field, kind = f[1], f[2]
        if e[field] ~= nil then
          local list, lerr = string_list(e[field], where .. "." .. field)
          if not list then
            return nil, lerr
          end
          local set, names = name_set(kind, list, where .. "." .. field, path)
          if not set then
            return nil, names
          end
          entry[field], entry[kind .. "_names"] = set, names
        end
      end
      if e.client_policy ~= nil then
        local cp, cperr = check_client_policy(e.client_policy, where .. ".client_policy")
        if not cp then
          return nil, cperr
        end
        entry.client_policy = cp
      end
      if e.request_timeout_ms ~= nil then
        local n, terr = request_timeout(e.request_timeout_ms, where .. ".request_timeout_ms")
        if not n then
          return nil, terr
        end
        entry.request_timeout_ms = n
      end
      if e.rate_limit ~= nil then
        if #name > 100 then
          return nil, where .. ": a client with a rate_limit has a name of at most 100 characters"
        end
        local rl, rerr = check_rate_limit(e.rate_limit, where .. ".rate_limit")
        if not rl then
          return nil, rerr
        end
        entry.rate_limit = rl
      end
      if e.cache ~= nil then -- this key's answers cached or not, whatever cache.enabled says
        if type(e.cache) ~= "boolean" then
          return nil, where .. ".cache: must be true or false"
        end
        entry.cache = e.cache
      end
      keys[#keys + 1] = v
      clients[#clients + 1] = entry
    end
  end
  c.client_keys = #keys > 0 and keys or nil
  c.clients = #clients > 0 and clients or nil

  -- workers = N: worker processes of `aiorch serve` (--workers overrides it).
  if raw.workers ~= nil then
    local n = math.tointeger(raw.workers)
    if not n or n < 0 or n > 1024 then
      return nil, "workers: must be an integer from 0 to 1024"
    end
    c.workers = n
  end
  -- prices = {model = {input, output, cached_read, cache_write, reasoning,
  -- source, date}}: over and beside the price table (aiorch.cost).
  if raw.prices ~= nil then
    local p, perr = cost.check(raw.prices)
    if not p then
      return nil, perr
    end
    c.prices = p
  end
  -- budgets = {{client = NAME or alias = NAME, usd, tokens, window, fail_closed}}
  if raw.budgets ~= nil then
    local names = {}
    for _, e in ipairs(clients) do
      names[e.name] = true
    end
    -- (loaded only for a configuration with budgets)
    local list, berr = require("aiorch.gateway.budgets").check(raw.budgets, names, c.aliases)
    if not list then
      return nil, berr
    end
    c.budgets = #list > 0 and list or nil
  end
  for _, k in ipairs(keys) do -- never echoed, whoever quotes them
    secrets.add(k)
  end

  c.getenv = getenv
  c.env_cache = {}
  return c
end

-- Loads FILE (a Lua chunk returning a table, run with no globals).
function _M.load(file, getenv, path)
  local f, oerr = io_open(file, "r")
  if not f then
    return nil, fmt("config: cannot open %s", tostring(oerr))
  end
  local text = f:read("a")
  f:close()
  local chunk, lerr = load(text, "@" .. file, "t", {})
  if not chunk then
    return nil, "config: " .. tostring(lerr)
  end
  local ok, raw = pcall(chunk)
  if not ok then
    return nil, "config: " .. tostring(raw)
  end
  local c, err = _M.check(raw, getenv, path)
  if not c then
    return nil, fmt("config %s: %s", file, err)
  end
  return c
end

-- The defaults when no file is given: providers from the environment.
function _M.default(getenv, path)
  return _M.check({}, getenv, path)
end

local ENV_VARS = { "AIORCH_TIMEOUT_MS", "AIORCH_CONNECT_TIMEOUT_MS", "AIORCH_PROVIDERS", "AIORCH_POLICY" }

local function prefix_of(name)
  return (name:upper():gsub("[^%w]", "_"))
end

-- The env table orchestrate reads for these model overrides
-- ({provider = model} or nil). One table per distinct override, cached, so
-- that aiorch.config caches provider configs per table.
function _M.env_for(c, models)
  local key = "-"
  if models then
    local parts = {}
    for _, n in ipairs(sorted_keys(models)) do
      parts[#parts + 1] = n .. "=" .. models[n]
    end
    key = concat(parts, ";")
  end
  local env = c.env_cache[key]
  if env then
    return env
  end
  local getenv = c.getenv
  env = {}
  for _, v in ipairs(ENV_VARS) do
    env[v] = getenv(v)
  end
  -- Every provider the gateway may call: the built-ins, plus configured ones.
  local names = { "openai", "anthropic", "gemini" }
  for n in pairs(c.providers) do
    names[#names + 1] = n
  end
  for _, n in ipairs(names) do
    local a = loader.load("provider", n, c.path)
    if a then
      local pre = prefix_of(n)
      local key_env = a.key_env
      if key_env == nil then
        key_env = pre .. "_API_KEY"
      end
      local base_env = a.base_url_env or pre .. "_BASE_URL"
      local model_env = a.model_env or pre .. "_MODEL"
      if key_env then
        env[key_env] = getenv(key_env)
        if a.key_env_fallback then -- (gemini: GOOGLE_API_KEY)
          env[a.key_env_fallback] = getenv(a.key_env_fallback)
        end
      end
      env[base_env] = getenv(base_env)
      env[model_env] = getenv(model_env)
      for _, var in pairs(a.env_fields or {}) do
        env[var] = getenv(var)
      end
      env[pre .. "_TIMEOUT_MS"] = getenv(pre .. "_TIMEOUT_MS")
      env[pre .. "_POLICY"] = getenv(pre .. "_POLICY")
      local p = c.providers[n]
      if p then
        if p.key_env and key_env then
          env[key_env] = getenv(p.key_env)
          if a.key_env_fallback then -- the configured variable only
            env[a.key_env_fallback] = nil
          end
        end
        env[base_env] = p.base_url or env[base_env]
        env[model_env] = p.model or env[model_env]
        env[pre .. "_TIMEOUT_MS"] = p.timeout_ms and tostring(p.timeout_ms) or env[pre .. "_TIMEOUT_MS"]
        env[pre .. "_POLICY"] = p.policy or env[pre .. "_POLICY"] -- a table: aiorch.config takes it as it is
        if p.deployments then -- (balance) a list: aiorch.config takes it as it is, and their keys' variables
          env[pre .. "_DEPLOYMENTS"], env[pre .. "_BALANCER"] = p.deployments, p.balancer
          for _, d in ipairs(p.deployments) do
            if d.api_key_env then
              env[d.api_key_env] = getenv(d.api_key_env)
            end
          end
        end
      end
      if models and models[n] then
        env[model_env] = models[n]
      end
    end
  end
  env.AIORCH_POLICY = c.policy or env.AIORCH_POLICY
  -- Configured providers are the default set, in their priority order.
  if #c.order > 0 then
    env.AIORCH_PROVIDERS = concat(c.order, ",")
  end
  c.env_cache[key] = env
  return env
end

-- Which providers serve which model: those that name it exactly (their
-- model and models), else those with the longest matching prefix (their
-- model_prefixes, else their adapter's: gpt-, o1, o3, o4, chatgpt- for
-- openai; claude- for anthropic), in priority order. Built once per
-- configuration.
local function model_table(c)
  local t = c.model_table
  if t then
    return t
  end
  t = { exact = {}, prefixes = {} }
  for _, n in ipairs(_M.provider_names(c)) do
    local a = loader.load("provider", n, c.path)
    local p = c.providers[n] or {}
    if a then
      local seen = {}
      local function exact(m)
        if type(m) == "string" and not seen[m] then
          seen[m] = true
          local list = t.exact[m] or {}
          list[#list + 1] = n
          t.exact[m] = list
        end
      end
      exact(p.model or a.default_model)
      for _, m in ipairs(p.models or {}) do
        exact(m)
      end
      for _, pre in ipairs(p.model_prefixes or a.model_prefixes or {}) do
        t.prefixes[#t.prefixes + 1] = { pre, n }
      end
    end
  end
  c.model_table = t
  return t
end

-- The providers that serve `model`, in priority order, or nil.
function _M.owners_of(c, model)
  local t = model_table(c)
  local list = t.exact[model]
  if list then
    return list
  end
  local best, out = 0, nil
  for _, e in ipairs(t.prefixes) do
    local pre = e[1]
    if #pre >= best and model:sub(1, #pre) == pre then
      if #pre > best then
        best, out = #pre, {}
      end
      if out[#out] ~= e[2] then
        out[#out + 1] = e[2]
      end
    end
  end
  return out
end

-- default_providers, when configured, keeps and orders the owners.
local function restrict(c, owners)
  local only = c.default_providers
  if not only then
    return owners
  end
  local set = {}
  for _, n in ipairs(owners) do
    set[n] = true
  end
  local out = {}
  for _, n in ipairs(only) do
    if set[n] then
      out[#out + 1] = n
    end
  end
  return #out > 0 and out or owners
end

-- A model's providers and env, once per model name (bounded: emptied when
-- full; clients choose the names).
local ROUTES_MAX = 1024
local function model_route(c, model)
  local cache = c.route_cache
  if not cache then
    cache = { n = 0, t = {} }
    c.route_cache = cache
  end
  local hit = cache.t[model]
  if hit ~= nil then
    return hit or nil
  end
  local owners = _M.owners_of(c, model)
  local by = false
  if owners then
    local models = {}
    for _, n in ipairs(owners) do
      models[n] = model
    end
    by = { providers = restrict(c, owners), env = _M.env_for(c, models) }
  end
  if cache.n >= ROUTES_MAX then
    cache.t, cache.n = {}, 0
    c.env_cache = {} -- its entries are per model too
  end
  cache.t[model] = by
  cache.n = cache.n + 1
  return by or nil
end

-- Chooses strategy, providers and env for a request.
-- strategy_h, providers_h: the X-Aiorch-* header values (or body fields);
-- model: the client's model name (nil: the native endpoint without one).
-- The model a client names is the model sent: an alias maps it to a model
-- per provider; otherwise it goes to the providers that serve it, unless
-- the client names the providers (those who do not serve it then use their
-- own models). Returns {strategy, providers, env, alias}, or nil, message
-- for a model no provider serves.
function _M.route(c, model, strategy_h, providers_h)
  local alias = type(model) == "string" and c.aliases[model] or nil
  local strategy = strategy_h or (alias and alias.strategy) or c.default_strategy
  local providers, models
  if alias then
    providers = providers_h or alias.providers or c.default_providers
    models = next(alias.models) and alias.models or nil
  elseif type(model) == "string" then
    local by = model_route(c, model)
    if not by and not providers_h then
      return nil, fmt("The model '%s' is not served here: no provider lists it (models, model_prefixes) and no "
        .. "alias names it", #model > 100 and model:sub(1, 100) .. "..." or model)
    end
    return { strategy = strategy, providers = providers_h or (by and { unpack(by.providers) }),
      env = by and by.env or _M.env_for(c, nil) }
  else
    providers = providers_h or c.default_providers
  end
  return { strategy = strategy, providers = providers, env = _M.env_for(c, models), alias = alias and model }
end

-- Provider names the gateway serves, in priority order.
function _M.provider_names(c)
  if #c.order > 0 then
    return c.order
  end
  local env = _M.env_for(c, nil)
  local list = env.AIORCH_PROVIDERS
  local out = {}
  for n in (list or "openai,anthropic"):gmatch("[^,%s]+") do
    out[#out + 1] = n
  end
  return out
end

return _M
