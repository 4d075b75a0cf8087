-- Budgets: USD and tokens per client key or per alias over a UTC calendar
-- window (minute, hour, day, month), held for the whole server through
-- aiorch.state's windows (shared by the workers; across replicas with
-- Redis).
--
-- A request reserves what it will likely spend (aiorch.cost.estimate:
-- its input from its text, its output from max_tokens or a default) when
-- it is admitted, in one atomic step that also reads what was spent: a
-- budget already spent (reservations included) refuses it, 429 with
-- Retry-After at the window's end. Once it ends, its reservation becomes
-- what it cost (every attempt, cancelled race losers included). So
-- concurrent requests never overspend by more than what the requests
-- already in flight when the budget ran out cost beyond their
-- reservations. A stream is checked before it starts, never cut.
local state = require "aiorch.state"
local cost = require "aiorch.cost"
local log = require "aiorch.log"

local type = type
local ipairs = ipairs
local pairs = pairs
local tostring = tostring
local fmt = string.format
local ceil = math.ceil
local max = math.max
local os_time = os.time
local os_date = os.date

local _M = {}

local MINUTE_MS, HOUR_MS, DAY_MS = 60000, 3600000, 86400000
-- The slots of aiorch.state's windows: a window's key names its calendar
-- period, so its count is what the period spent (the slots of one key
-- never belong to two periods). A month spans at most two 31-day slots.
local SLOT_MS = { minute = MINUTE_MS, hour = HOUR_MS, day = DAY_MS, month = 31 * DAY_MS }
_M.windows = { "minute", "hour", "day", "month" }

-- The period that holds t (seconds, UTC): its id and its end (seconds).
local function period(window, t)
  if window == "month" then
    local d = os_date("!*t", t)
    local y, m = d.year, d.month
    local ny, nm = y, m + 1
    if nm > 12 then
      ny, nm = y + 1, 1
    end
    -- the first second of the next month, UTC (days since the epoch, by the civil calendar)
    local function days(yy, mm)
      local a = (14 - mm) // 12
      local yy2, mm2 = yy + 4800 - a, mm + 12 * a - 3
      return 1 + (153 * mm2 + 2) // 5 + 365 * yy2 + yy2 // 4 - yy2 // 100 + yy2 // 400 - 32045 - 2440588
    end
    return y * 100 + m, days(ny, nm) * 86400
  end
  local len = SLOT_MS[window] // 1000
  local idx = t // len
  return idx, (idx + 1) * len
end
_M.period = period

-- Checks the configuration's budgets: a list of {client = NAME | alias =
-- NAME, usd = N, tokens = N, window = "minute"|"hour"|"day"|"month",
-- fail_closed = bool}. clients: the set of client names; aliases: the
-- configuration's aliases. Returns the list checked, or nil, message.
function _M.check(raw, clients, aliases)
  if type(raw) ~= "table" then
    return nil, "budgets: must be a list of {client = ... or alias = ..., usd = ..., tokens = ..., window = ...}"
  end
  local out = {}
  for i, b in ipairs(raw) do
    local where = fmt("budgets[%d]", i)
    if type(b) ~= "table" then
      return nil, where .. ": must be a table"
    end
    for k in pairs(b) do
      if k ~= "client" and k ~= "alias" and k ~= "usd" and k ~= "tokens" and k ~= "window" and k ~= "fail_closed" then
        return nil, fmt("%s: unknown field %q (known: client, alias, usd, tokens, window, fail_closed)", where,
          tostring(k))
      end
    end
    if (b.client == nil) == (b.alias == nil) then
      return nil, where .. ": names either a client (client = NAME) or an alias (alias = NAME)"
    end
    if b.client ~= nil and not (type(b.client) == "string" and clients[b.client]) then
      return nil, fmt("%s.client: %q is not a configured client (clients or client_keys_env)", where,
        tostring(b.client))
    end
    if b.alias ~= nil and not (type(b.alias) == "string" and aliases[b.alias]) then
      return nil, fmt("%s.alias: %q is not a configured alias", where, tostring(b.alias))
    end
    if not SLOT_MS[b.window] then
      return nil, where .. ".window: must be one of minute, hour, day, month"
    end
    if b.usd == nil and b.tokens == nil then
      return nil, where .. ": sets usd, tokens or both"
    end
    for _, k in ipairs({ "usd", "tokens" }) do
      local v = b[k]
      if v ~= nil and (type(v) ~= "number" or v ~= v or v <= 0 or v == math.huge) then
        return nil, fmt("%s.%s: must be a number > 0", where, k)
      end
    end
    if b.fail_closed ~= nil and type(b.fail_closed) ~= "boolean" then
      return nil, where .. ".fail_closed: must be true or false"
    end
    local who = b.client and ("client " .. b.client) or ("alias " .. b.alias)
    out[i] = { client = b.client, alias = b.alias, usd = b.usd, tokens = b.tokens, window = b.window,
      fail_closed = b.fail_closed == true, who = who, id = (b.client and "c" or "a") .. "\31" .. (b.client or b.alias)
      .. "\31" .. b.window }
  end
  return out
end

-- The budgets that apply to a request of client (its entry) on route rt
-- (an alias, or none): a list, or nil when none does.
function _M.applying(cfg, client, rt)
  local list = cfg.budgets
  if not list then
    return nil
  end
  local out
  local name, alias = client and client.name, rt.alias
  for _, b in ipairs(list) do
    if (b.client and b.client == name) or (b.alias and b.alias == alias) then
      out = out or {}
      out[#out + 1] = b
    end
  end
  return out
end

-- The window key of budget b's measure (usd or tokens) in the period pid.
local function key_of(gw, b, measure, pid)
  local ns = state.redis() and "" or gw.ns
  return ns .. "bu\31" .. b.id .. "\31" .. measure .. "\31" .. pid
end

-- Adds n under the period's key. Returns what the period spent with it,
-- and the slot; nil, kind, message when the state failed.
local function add(gw, b, measure, pid, n)
  local ok, slot, prev, _, c = state.window_add(key_of(gw, b, measure, pid), n, SLOT_MS[b.window], b.fail_closed)
  if not ok then
    return nil, slot, prev
  end
  return prev + c, slot
end

local function seconds_until(t_end)
  return tostring(max(1, ceil(t_end - os_time())))
end

-- Reserves what request (on model) will likely cost against each budget.
-- Returns the holds {budget, period, slots, reserved} (for settle), or nil
-- after answering the client: 429 when a budget is spent, 503 when one
-- that fails closed cannot be counted.
function _M.reserve(x, list, model, request, alias_models)
  local gw = x.state
  local usd, ti, to = cost.estimate(model, request)
  if not usd and alias_models then -- an alias: the dearest of its models
    for _, m in pairs(alias_models) do
      local u = cost.estimate(m, request)
      if u and (not usd or u > usd) then
        usd = u
      end
    end
  end
  local tokens = ti + to
  local t = os_time()
  local holds = {}
  local function undo_all()
    for _, h in ipairs(holds) do
      for measure, slot in pairs(h.slots) do
        state.undo(slot, h.reserved[measure])
      end
    end
  end
  for _, b in ipairs(list) do
    local pid, t_end = period(b.window, t)
    local h = { budget = b, pid = pid, slots = {}, reserved = {} }
    holds[#holds + 1] = h
    for _, measure in ipairs({ "usd", "tokens" }) do
      local limit = b[measure]
      if limit then
        local n = measure == "usd" and (usd or 0) or tokens
        local spent, slot, msg = add(gw, b, measure, pid, n)
        if not spent then
          if b.fail_closed then
            undo_all()
            x:fail(503, fmt("the budget of %s cannot be checked now (%s); retry shortly", b.who,
              tostring(msg or slot)), nil, { ["retry-after"] = "1" })
            return nil
          end
          state.warn("budget not counted", msg or slot)
        else
          h.slots[measure], h.reserved[measure] = slot, n
          if spent - n >= limit then
            undo_all()
            local wait = seconds_until(t_end)
            x:fail(429, fmt("budget spent: %s may spend %s per %s (UTC); it resets in %s s", b.who,
              measure == "usd" and fmt("%.6g USD", limit) or fmt("%.0f tokens", limit), b.window, wait),
              "budget_exceeded", { ["retry-after"] = wait })
            return nil
          end
        end
      end
    end
  end
  return holds
end

-- Turns the reservations into what the request spent (spend: aiorch.call's
-- {usd, tokens}). Runs once, in a task of its own (it may yield on Redis).
function _M.settle(holds, spend)
  for _, h in ipairs(holds) do
    for measure, slot in pairs(h.slots) do
      local actual = measure == "usd" and spend.usd or spend.tokens
      local delta = h.reserved[measure] - actual
      if delta ~= 0 then
        local ok, err = pcall(state.undo, slot, delta)
        if not ok then
          log.warn("budget: %s's spending not counted: %s", h.budget.who, tostring(err))
        end
      end
    end
  end
end

-- What is left of the budgets in list now: {usd, tokens, window,
-- resets_at (seconds since the epoch), limit_usd, limit_tokens}, the
-- tightest of each measure; nil when the state cannot say.
function _M.remaining(gw, list)
  local t = os_time()
  local out, by
  for _, b in ipairs(list) do
    local pid, t_end = period(b.window, t)
    for _, measure in ipairs({ "usd", "tokens" }) do
      local limit = b[measure]
      local spent = limit and add(gw, b, measure, pid, 0)
      if spent then
        local left = max(limit - spent, 0)
        out = out or {}
        if out[measure] == nil or left < out[measure] then
          out[measure], out["limit_" .. measure] = left, limit
          if measure == "usd" or not (by and by.usd) then
            by = { usd = measure == "usd", window = b.window, resets_at = t_end }
          end
        end
      end
    end
  end
  if out then
    out.window, out.resets_at = by.window, by.resets_at
  end
  return out
end

return _M
