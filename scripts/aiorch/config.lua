-- Provider configuration from the environment. A provider is available
-- when its key is set. Keys stay in these tables: never log or return them;
-- each key read is registered with aiorch.secrets, so that error text
-- relayed from any provider is scrubbed of it.
local log = require "aiorch.log"
local policy = require "aiorch.policy"
local secrets = require "aiorch.secrets"

local fmt = string.format
local type = type
local setmetatable = setmetatable
local ipairs = ipairs
local pairs = pairs
local tonumber = tonumber
local os_getenv = os.getenv
local concat = table.concat

local _M = {}

_M.default_priority = { "openai", "anthropic" }
_M.default_timeout_ms = 60000
_M.default_connect_timeout_ms = 10000

-- env: nil (the process environment), a table, or a function(name).
local function getter(env)
  if env == nil then
    return os_getenv
  elseif type(env) == "table" then
    return function(k) return env[k] end
  end
  return env
end

-- Trimmed, so a key pasted with a trailing newline still works.
local function nonempty(v)
  if type(v) == "string" then
    v = v:match("^%s*(.-)%s*$")
    if v ~= "" then
      return v
    end
  end
  return nil
end

local function env_prefix(name)
  return (name:upper():gsub("[^%w]", "_"))
end

local function positive(v)
  local n = tonumber(v)
  if n and n > 0 then
    return n
  end
  return nil
end

-- The providers' default order: AIORCH_PROVIDERS ("a,b") or openai, anthropic.
function _M.priority(env)
  local get = getter(env)
  local list = nonempty(get("AIORCH_PROVIDERS"))
  if not list then
    return { table.unpack(_M.default_priority) }
  end
  local out = {}
  for n in list:gmatch("[^,%s]+") do
    out[#out + 1] = n
  end
  return out
end

-- Why a provider is unavailable, in words fit for an error message.
function _M.unavailable_reason(cfg)
  if cfg.key_env_fallback then
    return fmt("%s is not set (nor %s)", cfg.key_env, cfg.key_env_fallback)
  elseif cfg.key_env then
    return fmt("%s is not set", cfg.key_env)
  end
  return fmt("%s is not available", cfg.name)
end

-- One provider's configuration from its adapter's fields and the env.
function _M.provider(name, adapter, env)
  local get = getter(env)
  local prefix = env_prefix(name)
  local key_env = adapter.key_env
  if key_env == nil then
    key_env = prefix .. "_API_KEY"
  end
  local key = key_env and nonempty(get(key_env)) or nil
  -- A second variable the key may be in (gemini: GOOGLE_API_KEY).
  local fallback = key_env and adapter.key_env_fallback
  if not key and fallback then
    key = nonempty(get(fallback))
  end
  secrets.add(key)
  local base_env = adapter.base_url_env or prefix .. "_BASE_URL"
  local model_env = adapter.model_env or prefix .. "_MODEL"
  local cfg = {
    name = name,
    key = key,
    key_env = key_env,
    key_env_fallback = fallback or nil,
    -- An adapter with key_env = false needs no key (a local server).
    available = key_env == false or key ~= nil,
    base_url = nonempty(get(base_env)) or adapter.default_base_url,
    model = nonempty(get(model_env)) or adapter.default_model,
    timeout_ms = positive(get(prefix .. "_TIMEOUT_MS")) or positive(get("AIORCH_TIMEOUT_MS"))
      or _M.default_timeout_ms,
    connect_timeout_ms = positive(get("AIORCH_CONNECT_TIMEOUT_MS")) or _M.default_connect_timeout_ms,
  }
  -- An adapter's own settings (env_fields = {field = VAR}: Azure's api_version).
  for field, var in pairs(adapter.env_fields or {}) do
    cfg[field] = nonempty(get(var))
  end
  -- The policy: AIORCH_POLICY for every provider, then <NAME>_POLICY; each a
  -- table (from a gateway configuration) or "name=value,..." (from the shell).
  local merged = { timeout_ms = cfg.timeout_ms, connect_timeout_ms = cfg.connect_timeout_ms }
  for _, var in ipairs { "AIORCH_POLICY", prefix .. "_POLICY" } do
    local v = get(var)
    local t, err = v, nil
    if type(v) == "string" then
      t, err = policy.parse(v, var)
    end
    if t ~= nil then
      t, err = policy.check(t, var, true)
    end
    if err then
      cfg.available, cfg.unavailable = false, err
      break
    end
    for k, x in pairs(t or {}) do
      merged[k] = x
    end
  end
  cfg.policy = policy.for_provider(merged)
  -- Deployments (aiorch.deployments): NAME_DEPLOYMENTS, a list from a
  -- configuration; the provider is available when one of them is.
  local deps = get(prefix .. "_DEPLOYMENTS")
  if deps ~= nil and not cfg.unavailable then
    local list, derr = require("aiorch.deployments").configure(cfg, deps, get, secrets.add,
      prefix .. "_DEPLOYMENTS")
    if not list then
      cfg.available, cfg.unavailable = false, derr
    else
      cfg.deployments, cfg.balancer = list, nonempty(get(prefix .. "_BALANCER")) or "weighted"
      cfg.balanced = true -- (aiorch.context: a provider or deployment to balance)
      cfg.available, cfg.deployment_ids = false, {}
      for i, d in ipairs(list) do
        cfg.available = cfg.available or d.available
        cfg.deployment_ids[i] = d.breaker_key
      end
      cfg.unavailable = not cfg.available and list[1].unavailable or nil
    end
  end
  if not cfg.available and not cfg.unavailable then
    cfg.unavailable = _M.unavailable_reason(cfg)
  end
  return cfg
end

-- Configs are read once per env table (weakly keyed) and once for the
-- process environment: the env does not change under a running request.
local by_env = setmetatable({}, { __mode = "k" })
local process_env = {}

function _M.cached(name, adapter, env)
  local t
  if env == nil then
    t = process_env
  elseif type(env) == "table" then
    t = by_env[env]
    if not t then
      t = {}
      by_env[env] = t
    end
  else
    return _M.provider(name, adapter, env)
  end
  local e = t[name]
  if e and e.adapter == adapter then
    return e.config
  end
  local c = _M.provider(name, adapter, env)
  t[name] = { adapter = adapter, config = c }
  return c
end

local announced = false

-- Logs once which adapters came up, and warns when none did.
function _M.announce(configs, order)
  if announced then
    return
  end
  announced = true
  local up, hints = {}, {}
  for _, name in ipairs(order) do
    local c = configs[name]
    if c and c.available then
      up[#up + 1] = name
      -- A base URL may carry user:password@; that stays out of the log.
      local url = (c.base_url or "?"):gsub("//[^/@]*@", "//")
      log.info("adapter %s up (model %s, %s)", name, c.model or "?", url)
    elseif c and c.key_env then
      hints[#hints + 1] = c.key_env
    end
  end
  if #up == 0 then
    log.warn("no provider adapter is available (set %s)",
      #hints > 0 and concat(hints, " or ") or "a provider key")
  end
end

return _M
