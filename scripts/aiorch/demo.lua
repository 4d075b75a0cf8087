-- `aiorch demo`: every strategy against mock providers started in this
-- process on 127.0.0.1, with different latencies and one injected failure.
-- Needs no keys and no network; the dummy keys below only reach the mock.
local core = require "aiorch"
local mock = require "aiorch.mock"
local orchestrate = require "aiorch.orchestrate"
local breaker = require "aiorch.breaker"

local fmt = string.format
local type = type
local ipairs = ipairs
local pairs = pairs
local tostring = tostring
local concat = table.concat
local io_stdout = io.stdout

local _M = {}

local LATENCY = { openai = 120, anthropic = 80 }
local QUESTION = "Which strategy should I use in production?"

local function env_for(m, openai_directives, anthropic_directives)
  return {
    OPENAI_API_KEY = "demo-openai-key",
    ANTHROPIC_API_KEY = "demo-anthropic-key",
    OPENAI_BASE_URL = m:base_url("openai", openai_directives),
    ANTHROPIC_BASE_URL = m:base_url("anthropic", anthropic_directives),
  }
end

local function attempt_text(a)
  local s = a.provider .. ":" .. (a.kind or a.status)
  local extra = {}
  if a.http_status and a.status ~= "success" then
    extra[#extra + 1] = tostring(a.http_status)
  end
  if a.latency_ms and a.status ~= "cancelled" then
    extra[#extra + 1] = fmt("%d ms", a.latency_ms)
  end
  if #extra > 0 then
    s = s .. "(" .. concat(extra, ", ") .. ")"
  end
  return s
end

local function excerpt(s, n)
  s = tostring(s or ""):gsub("%s+", " ")
  if #s > n then
    s = s:sub(1, n - 3) .. "..."
  end
  return s
end

-- The mock's record of a provider's request in the last run.
local function request_of(m, api)
  for _, r in ipairs(m.requests) do
    if r.api == api then
      return r
    end
  end
  return nil
end

-- The provider's request, once the mock saw its client go (at most 250 ms).
local function aborted_request(m, api)
  local req
  for _ = 1, 50 do
    req = request_of(m, api)
    if req and req.aborted_at then
      break
    end
    core.sleep(5)
  end
  return req
end

local RUNS = {
  {
    strategy = "single", providers = { "openai" },
    env = function(m) return env_for(m, { latency_ms = LATENCY.openai }, { latency_ms = LATENCY.anthropic }) end,
    check = function(r)
      return r.status == "success" and r.ia_provider_name == "openai", "openai answers"
    end,
  },
  {
    strategy = "parallel",
    env = function(m) return env_for(m, { latency_ms = LATENCY.openai }, { latency_ms = LATENCY.anthropic }) end,
    check = function(list)
      local ok = type(list) == "table" and #list == 2
      for _, r in ipairs(ok and list or {}) do
        ok = ok and r.status == "success"
      end
      return ok, "both answer, wall time = the slowest"
    end,
  },
  {
    strategy = "fallback",
    env = function(m)
      return env_for(m, { latency_ms = 30, fault = "429", retry_after = 2 }, { latency_ms = LATENCY.anthropic })
    end,
    check = function(r)
      local a = r.metadata and r.metadata.attempts or {}
      return r.status == "success" and r.ia_provider_name == "anthropic" and #a == 2
        and a[1].kind == "rate_limited" and a[1].http_status == 429,
        "openai is rate limited (429), anthropic answers"
    end,
  },
  {
    strategy = "fastest",
    env = function(m) return env_for(m, { latency_ms = LATENCY.openai }, { latency_ms = LATENCY.anthropic }) end,
    check = function(r, m)
      -- The loser's connection must be closed as soon as the winner answers.
      local loser = aborted_request(m, "openai")
      local ok = r.status == "success" and r.ia_provider_name == "anthropic"
        and loser ~= nil and loser.aborted_at ~= nil
      return ok, "anthropic wins, openai's transfer is aborted", loser
    end,
  },
  {
    -- openai is having a slow moment: after 100 ms anthropic is asked too.
    strategy = "hedged", request = { policy = { hedge_delay_ms = 100 } },
    env = function(m) return env_for(m, { latency_ms = 400 }, { latency_ms = LATENCY.anthropic }) end,
    check = function(r, m)
      local loser = aborted_request(m, "openai")
      local a = r.metadata and r.metadata.attempts or {}
      local ok = r.status == "success" and r.ia_provider_name == "anthropic" and #a == 2
        and a[1].status == "cancelled" and loser ~= nil and loser.aborted_at ~= nil
      return ok, "openai is slow (400 ms), anthropic is hedged in after 100 ms and wins", loser
    end,
  },
}

local function row(cols)
  return fmt("%-9s %-17s %-8s %7s %11s  %s\n", cols[1], cols[2], cols[3], cols[4], cols[6] or "", cols[5])
end

-- What a result cost (a list: all of it): "$0.0000530", "~$…" for an
-- estimate, "-" when unknown (a model without a price).
local function cost_text(result)
  local list = result.status and { result } or result
  local usd, estimated = 0, false
  for _, r in ipairs(list) do
    local c = r.metadata and r.metadata.cost_usd
    if c == nil then
      return "-"
    end
    usd = usd + c
    estimated = estimated or r.metadata.cost_estimated == true
  end
  return (estimated and "~$" or "$") .. fmt("%.7f", usd)
end

function _M.main()
  local m, err = mock.start { host = "127.0.0.1", port = 0 }
  if not m then
    io.stderr:write("aiorch: demo: cannot start the mock providers: ", tostring(err), "\n")
    return 1
  end
  local function put(s)
    io_stdout:write(s)
  end
  put(fmt("aiorch demo: mock providers on %s (openai ~%d ms, anthropic ~%d ms; no keys, no network)\n\n",
    m.url, LATENCY.openai, LATENCY.anthropic))
  put(row { "STRATEGY", "ANSWERED BY", "STATUS", "WALL", "ATTEMPTS", "COST" })

  local answers, all_ok = {}, true
  for _, run in ipairs(RUNS) do
    m:reset()
    -- Each row starts from healthy providers: the fallback row's 429 asks
    -- for a pause that would otherwise make the next rows skip openai.
    breaker.reset()
    local t0 = core.now()
    local req = { user_question = QUESTION }
    for k, v in pairs(run.request or {}) do
      req[k] = v
    end
    local result, _, rerr = orchestrate.orchestrate(req, run.strategy, run.providers, { env = run.env(m) })
    local wall = fmt("%d ms", math.floor(core.now() - t0 + 0.5))
    if not result then
      all_ok = false
      put(row { run.strategy, "-", "invalid", wall, tostring(rerr) })
    else
      local ok, expect, loser = run.check(result, m)
      all_ok = all_ok and ok
      local mark = ok and "" or "   <- UNEXPECTED: expected " .. expect
      if run.strategy == "parallel" then
        local names, statuses, atts = {}, {}, {}
        for i, r in ipairs(result) do
          names[i], statuses[i] = r.ia_provider_name, r.status
          atts[i] = attempt_text { provider = r.ia_provider_name, status = r.status,
            kind = r.metadata.error_kind, latency_ms = r.latency_ms, http_status = r.metadata.http_status }
          answers[#answers + 1] = { run.strategy, r.ia_provider_name, r.response_text }
        end
        put(row { run.strategy, concat(names, "+"), statuses[1] == statuses[2] and statuses[1] or "mixed",
          wall, concat(atts, " | ") .. mark, cost_text(result) })
      else
        local atts = {}
        for i, a in ipairs(result.metadata.attempts or {}) do
          atts[i] = attempt_text(a)
        end
        if #atts == 0 then
          atts[1] = attempt_text { provider = result.ia_provider_name, status = result.status,
            kind = result.metadata.error_kind, latency_ms = result.latency_ms }
        end
        local sep = (run.strategy == "fallback" or run.strategy == "hedged") and " → " or ", "
        local note = ""
        if loser and loser.aborted_at then
          local closed = math.floor(loser.aborted_at - loser.received_at + 0.5)
          note = fmt(" [openai's connection closed after %d ms]", closed)
        end
        put(row { run.strategy, result.ia_provider_name, result.status, wall, concat(atts, sep) .. note .. mark,
          cost_text(result) })
        answers[#answers + 1] = { run.strategy, result.ia_provider_name,
          result.status == "success" and result.response_text or result.error_message }
      end
    end
  end

  put("\nanswers:\n")
  for _, a in ipairs(answers) do
    put(fmt("  %-9s %-10s %s\n", a[1], a[2], excerpt(a[3], 90)))
  end
  put(all_ok and "\nevery strategy behaved as expected\n" or "\nsome strategy did not behave as expected\n")
  m:close()
  return all_ok and 0 or 1
end

return _M
