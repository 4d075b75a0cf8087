-- One provider call: adapter.build_request -> aiorch.http.request (yields)
-- -> parse -> StandardAIResponse. Never raises because a provider misbehaved.
local core = require "aiorch"
local response = require "aiorch.response"
local metrics = require "aiorch.metrics"
local util = require "aiorch.adapter"
local log = require "aiorch.log"
local policy = require "aiorch.policy"
local breaker = require "aiorch.breaker"
local secrets = require "aiorch.secrets"
local json = require "aiorch.json"
local cost = require "aiorch.cost"

local fmt = string.format
local type = type
local pairs = pairs
local ipairs = ipairs
local pcall = pcall
local tostring = tostring
local setmetatable = setmetatable
local getmetatable = getmetatable
local http = core.http
local now = core.now
local sleep = core.sleep
local floor = math.floor
local ceil = math.ceil
local concat = table.concat

local EMPTY = {} -- never written
local legacy_sink -- below

local _M = {}

-- Providers sometimes quote a key back (in a 401, say), whole or
-- transformed: every secret the process knows is removed (aiorch.secrets,
-- where this call's key is registered too), and the text is one line.
local function scrub(msg, key)
  secrets.add(key)
  return (secrets.scrub(tostring(msg or "")):gsub("[\r\n]+", " "))
end

-- The provider's error type and code ({type, code}, strings), scrubbed.
local function provider_error(pe, key)
  if type(pe) ~= "table" then
    return nil
  end
  local t, c = pe.type, pe.code
  t = (type(t) == "string" or type(t) == "number") and scrub(t, key) or nil
  c = (type(c) == "string" or type(c) == "number") and scrub(c, key) or nil
  return (t or c) and { type = t, code = c } or nil
end

local function fail(name, config, kind, msg, t0, meta)
  meta = meta or {}
  meta.model = meta.model or config.model
  meta.provider_error = provider_error(meta.provider_error, config.key)
  return response.error(name, kind, scrub(msg, config.key), now() - t0, meta)
end

local function finish(name, resp)
  metrics.finished(name, resp)
  if log.enabled("debug") then
    log.debug("%s: %s in %d ms%s", name, resp.status, resp.latency_ms,
      resp.error_message and (" (" .. resp.error_message .. ")") or "")
  end
  return resp
end

-- Header values already checked (free of CR and LF): the same few repeat.
local checked, n_checked = {}, 0

local function header_ok(v)
  local tv = type(v)
  if tv == "number" or checked[v] then
    return true
  end
  if tv ~= "string" or v:find("[\r\n]") then
    return false
  end
  if #v <= 512 then
    if n_checked >= 256 then
      checked, n_checked = {}, 0
    end
    checked[v] = true
    n_checked = n_checked + 1
  end
  return true
end

-- A copy of a decoded JSON value with every string scrubbed (keys too).
local function scrub_value(v, key, depth)
  local tv = type(v)
  if tv == "string" then
    return scrub(v, key)
  elseif tv ~= "table" or depth > 16 then
    return tv == "table" and nil or v
  end
  local out = setmetatable({}, getmetatable(v)) -- (aiorch.json's array and object marks)
  for k, x in pairs(v) do
    out[type(k) == "string" and scrub(k, key) or k] = scrub_value(x, key, depth + 1)
  end
  return out
end

-- The upstream's refusal of the request itself: a 4xx other than auth
-- (the gateway's key), a timeout or a rate limit. Kept as the API wrote it
-- ({api, provider, status, body = the decoded body, scrubbed}), so that a caller of
-- the same API gets it as the provider sent it (an SDK reads its details
-- to recover). Bodies over REJECTION_MAX are not kept.
local REJECTION_MAX = 16 * 1024
local NOT_REJECTIONS = { [401] = true, [403] = true, [408] = true, [429] = true }
local function rejection(adapter, config, status, body)
  if status < 400 or status > 499 or NOT_REJECTIONS[status] or type(body) ~= "string" or #body > REJECTION_MAX then
    return nil
  end
  local doc = json.decode(body)
  if type(doc) ~= "table" or type(doc.error) ~= "table" then
    return nil
  end
  return { api = adapter.api, provider = config.name, status = status, body = scrub_value(doc, config.key, 0) }
end

-- What a stream parser saw of the usage before the stream ended.
local function parser_usage(p)
  if not p then
    return nil
  end
  local u = p.usage
  local i = type(u) == "table" and u.input_tokens or p.input_tokens
  local o = type(u) == "table" and u.output_tokens or p.output_tokens
  if type(i) == "number" or type(o) == "number" then
    if type(u) == "table" then
      return u
    end
    return { input_tokens = i, output_tokens = o }
  end
  return nil
end

-- The text a stream had sent before it failed.
local function partial_text(p, emitted)
  if emitted and p and type(p.parts) == "table" and #p.parts > 0 then
    return concat(p.parts)
  end
  return nil
end

-- Tokens a provider reported for work that produced no answer: a failed
-- attempt, a cancelled race loser. They cost money; count them.
local function count_wasted(name, usage)
  if usage then
    metrics.count(name, "tokens_wasted_in", usage.input_tokens or 0)
    metrics.count(name, "tokens_wasted_out", usage.output_tokens or 0)
  end
end

-- What an attempt cost: the metrics by provider, model and client, and
-- the caller's running total. orch: the orchestration's state (its opts:
-- client, the name to count it under; spend, {usd, tokens} to add to), or nil.
local function charge(name, model, usage, usd, estimated, orch)
  local opts = orch and orch.opts
  if not opts then
    metrics.spend(name, model, nil, usage, usd)
    return
  end
  metrics.spend(name, model, opts.client, usage, usd)
  local spend = opts.spend
  if spend then
    local i, o = usage.input_tokens, usage.output_tokens
    spend.tokens = spend.tokens + (i or 0) + (o or 0)
    if usd then
      spend.usd = spend.usd + usd
    elseif i or o then
      spend.unpriced = true
    end
    if estimated then
      spend.estimated = true
    end
  end
end

-- Charges a finished attempt; a failure that reported usage gets its
-- metadata.cost_usd here (a success got it from response.success).
local function priced(name, resp, orch, request)
  local m = resp.metadata
  local usage = m.usage
  if usage == nil then
    return resp
  end
  local usd = m.cost_usd
  if resp.status ~= "success" then
    usd = cost.of(m.model, usage)
    m.cost_usd = usd
  elseif usd == nil and usage.input_tokens == nil and usage.output_tokens == nil then
    -- An answer that came without its usage (a stream not asked for it,
    -- a server that does not count): priced on estimates, said so;
    -- metadata.usage stays what the provider reported.
    local i = cost.estimate_tokens(request)
    usage = { input_tokens = i, output_tokens = cost.tokens_of_text(#(resp.response_text or "")) }
    usd = cost.of(m.model, usage)
    m.cost_usd, m.cost_estimated = usd, true
    charge(name, m.model, usage, usd, true, orch)
    return resp
  end
  -- charge, inline: every answer comes here
  local opts = orch and orch.opts
  metrics.spend(name, m.model, opts and opts.client, usage, usd)
  local spend = opts and opts.spend
  if spend then
    spend.tokens = spend.tokens + (usage.input_tokens or 0) + (usage.output_tokens or 0)
    if usd then
      spend.usd = spend.usd + usd
    else
      spend.unpriced = true
    end
  end
  return resp
end

-- The usage of a stream cancelled before its end: the counts the provider
-- had reported, else estimates (the request's text for the input, the
-- streamed text for the output). Returns the usage and whether it is an estimate.
local function cancelled_usage(p, request)
  local u = parser_usage(p) or EMPTY
  local estimated = false
  local i = u.input_tokens
  if type(i) ~= "number" then
    i = cost.estimate_tokens(request)
    estimated = true
  end
  local chars = 0
  if p and type(p.parts) == "table" then
    for _, t in ipairs(p.parts) do
      chars = chars + #t
    end
  end
  local o = u.output_tokens
  local streamed = cost.tokens_of_text(chars)
  if type(o) ~= "number" or o < streamed then
    o = streamed
    estimated = true
  end
  return { input_tokens = i, output_tokens = o, cached_input_tokens = u.cached_input_tokens,
    cache_write_tokens = u.cache_write_tokens }, estimated
end

-- Ends an attempt whose task was cancelled before it finished: a race or
-- hedge loser is charged what it had consumed (orch.cancelled lists
-- it for the orchestration's answer). A deployment's attempt, however it
-- ends, is no longer in flight.
local cancel_guard = {
  __close = function(g)
    local dep = g.dep
    if dep then
      dep.inflight = dep.inflight - 1
    end
    if not g.finished then
      local name = g.name
      metrics.cancelled(name)
      breaker.release(g.bkey or name, g.trial)
      local p = g.parser
      if not p then
        return -- no stream: nothing was reported, and a request alone is not charged
      end
      local usage, estimated = cancelled_usage(p, g.request)
      count_wasted(name, usage)
      local model = p.model or g.model
      local usd = cost.of(model, usage)
      if usd then
        metrics.count(name, "cost_usd", usd)
      end
      local orch = g.orch
      charge(name, model, usage, usd, estimated, orch)
      if orch then
        local list = orch.cancelled or {}
        orch.cancelled = list
        list[#list + 1] = { provider = name, cost_usd = usd, cost_estimated = estimated, usage = usage }
      end
    end
  end,
}

-- Stream events that are content: the first one commits a stream.
local CONTENT = { text = true, thinking = true, thinking_signature = true, redacted_thinking = true,
  tool_call = true, tool_arguments = true }
_M.CONTENT = CONTENT

-- Asks a stream parser for canonical events (an adapter of the first kind
-- ignores it and returns text deltas: events_of takes both).
local STREAM_EVENTS = { events = true }

-- What a stream parser's event() returned, as a list of canonical events:
-- nil, one event, a list, or (an adapter of the first kind) a text delta.
local function events_of(out, ev)
  local t = type(out)
  if t == "string" then
    return out ~= "" and { { type = "text", text = out, raw = ev } } or nil
  elseif t ~= "table" then
    return nil
  elseif out.type then
    return { out }
  end
  return #out > 0 and out or nil
end

-- The index of the first content event of a list, or nil.
local function first_content(list)
  for i = 1, #list do
    if CONTENT[list[i].type] then
      return i
    end
  end
  return nil
end

-- Hands list[from..] to the sink; info goes with the first of them.
local function deliver(sink, list, from, name, info)
  for i = from, #list do
    sink(list[i], name, info)
    info = nil
  end
end

-- One HTTP attempt. Returns the response and whether a token went out.
-- dep: a deployment's figures (config.stats), or nil.
local function attempt(adapter, config, request, opts, pol, trial, orch, dep)
  local name = config.name
  local t0 = now()
  metrics.started(name)
  local guard <close> = setmetatable({ name = name, finished = false, trial = trial }, cancel_guard)
  -- A deployment (aiorch.deployments): its in-flight count and figures.
  if dep then
    guard.dep, guard.bkey = dep, config.breaker_key
    dep.inflight = dep.inflight + 1
  end

  local stream = opts.stream and type(adapter.stream_parser) == "function"
  local ok, wire = pcall(adapter.build_request, config, request, { stream = stream, model = config.model })
  if not ok or type(wire) ~= "table" then
    guard.finished = true
    return finish(name, fail(name, config, "adapter", "build_request failed: " .. tostring(wire), t0)), false
  end

  -- aiorch.http raises on CR/LF in a header value; name the header, not its value.
  for k, v in pairs(wire.headers or {}) do
    if not header_ok(v) then
      guard.finished = true
      return finish(name, fail(name, config, "bad_request", fmt("invalid value for header '%s'", tostring(k)), t0)),
        false
    end
  end

  local parser, events, stream_err, emitted
  local on_event
  if stream then
    local pok, p = pcall(adapter.stream_parser, config, STREAM_EVENTS)
    if not pok or type(p) ~= "table" then
      guard.finished = true
      return finish(name, fail(name, config, "adapter", "stream_parser failed: " .. tostring(p), t0)), false
    end
    parser, events, emitted = p, 0, false
    -- what a cancelled stream is charged with (a call that does not stream reported nothing)
    guard.parser, guard.orch, guard.request, guard.model = p, orch, request, config.model
    local sink = opts.on_event
    local held -- this attempt's events before its first content (a same-API caller relays them)
    -- Returns true for a content event: that meets the first-token deadline.
    on_event = function(ev)
      events = events + 1
      local eok, out = pcall(parser.event, parser, ev)
      if not eok then
        stream_err = "stream parser failed: " .. tostring(out)
        return false
      end
      local list = events_of(out, ev)
      if not list then
        return nil
      end
      local first = first_content(list)
      if not first then
        if sink and not emitted then
          held = held or {}
          for i = 1, #list do
            held[#held + 1] = list[i]
          end
        elseif sink then
          local sok, serr = pcall(deliver, sink, list, 1, name, nil)
          if not sok then
            stream_err = "on_event failed: " .. tostring(serr)
            return false
          end
        end
        return nil
      end
      if sink then
        local info
        if not emitted then -- the first content of this attempt: it may commit the stream
          held = held or {}
          for i = 1, first - 1 do
            held[#held + 1] = list[i]
          end
          info = { prelude = held, model = parser.model or config.model, api = adapter.api }
          held = nil
        end
        emitted = true
        local sok, serr = pcall(deliver, sink, list, info and first or 1, name, info)
        if not sok then
          stream_err = "on_event failed: " .. tostring(serr)
          return false
        end
      end
      return true
    end
  end

  -- The options a call always has, then those it may (7 fields and up
  -- to 8 nodes: from the allocator's lists, see aiorch.response.success).
  local hopts = {
    method = wire.method or "POST",
    url = wire.url,
    headers = wire.headers,
    body = wire.body,
    timeout_ms = pol.timeout_ms,
    connect_timeout_ms = pol.connect_timeout_ms,
    max_body = pol.max_response_bytes,
  }
  if on_event then
    hopts.on_event = on_event
  end
  if pol.headers_timeout_ms or pol.first_token_timeout_ms or pol.gap_timeout_ms then
    hopts.headers_timeout_ms = pol.headers_timeout_ms
    hopts.first_event_timeout_ms = pol.first_token_timeout_ms
    hopts.gap_timeout_ms = pol.gap_timeout_ms
  end
  local status, headers, body, deadline = http.request(hopts)
  guard.finished = true
  if dep and status then
    require("aiorch.deployments").observe_headers(dep, headers, now())
  end

  if not status then
    local kind, msg = headers, body
    local usage = parser_usage(parser)
    count_wasted(name, usage)
    local partial = partial_text(parser, emitted)
    if stream_err then
      return finish(name, priced(name, fail(name, config, "stream", stream_err, t0,
        { usage = usage, partial_text = partial }), orch, request)), emitted
    end
    -- A stream that broke after it began is a cut answer, not a connect error.
    if events and events > 0 and kind ~= "timeout" and kind ~= "too_large" then
      return finish(name, priced(name, fail(name, config, "stream_cut",
        fmt("stream cut after %d events: %s", events, tostring(msg or kind)), t0,
        { usage = usage, partial_text = partial }), orch, request)), emitted
    end
    return finish(name, priced(name, fail(name, config, tostring(kind or "http"), msg or kind, t0,
      { deadline = deadline, usage = usage, partial_text = partial }), orch, request)), emitted
  end

  local result, kind, msg, extra
  if parser and status >= 200 and status < 300 and util.is_event_stream(headers) then
    local rok, r, k, m, x = pcall(parser.result, parser)
    if rok then
      result, kind, msg, extra = r, k, m, x
    else
      kind, msg = "adapter", "stream parser failed: " .. tostring(r)
    end
  else
    local pok, r, k, m, x = pcall(adapter.parse_response, config, status, headers, body)
    if pok then
      result, kind, msg, extra = r, k, m, x
    else
      kind, msg = "adapter", "parse_response failed: " .. tostring(r)
    end
  end

  if type(result) == "table" then
    local r = response.success(name, result, now() - t0, status, adapter.api)
    return finish(name, priced(name, r, orch, request)), emitted
  end
  local usage = parser_usage(parser)
  count_wasted(name, usage)
  return finish(name, priced(name, fail(name, config, kind or "parse", msg or "no result", t0, {
    http_status = status,
    retry_after = type(extra) == "table" and extra.retry_after or nil,
    provider_error = type(extra) == "table" and extra.provider_error or nil,
    upstream_error = rejection(adapter, config, status, body),
    usage = usage,
    partial_text = partial_text(parser, emitted),
  }), orch, request)), emitted
end

-- What a provider's attempts cost together (the caller pays for each):
-- nil when one that reported tokens had no price (last: the last one's).
local function total_cost(attempts, last)
  local total = 0
  for _, a in ipairs(attempts) do
    if a.cost_usd then
      total = total + a.cost_usd
    elseif a.unpriced then
      return nil
    end
  end
  return (last or total > 0) and total or nil
end

-- opts.on_token(text, provider) of a caller that wants only the text: an
-- on_event sink that passes it the text events.
function legacy_sink(opts)
  local o = {}
  for k, v in pairs(opts) do
    o[k] = v
  end
  local on_token = opts.on_token
  o.on_event = function(ev, provider)
    if ev.type == "text" then
      on_token(ev.text, provider)
    end
  end
  return o
end

-- call(adapter, config, request[, opts]) -> StandardAIResponse
-- config: from aiorch.config.provider; request: a validated AIRequest.
-- opts: stream, on_event(event, provider, info) (see aiorch.context) or
-- on_token(text, provider), timeout_ms, policy. orch: the orchestration's
-- state (aiorch.context: what the calls cost is counted for its opts.client
-- and added to its opts.spend; cancelled calls listed in orch.cancelled), or nil.
-- Retries the provider as its policy says; metadata.attempts lists every
-- attempt. Never retries once a token went to the caller.
function _M.call(adapter, config, request, opts, orch)
  opts = opts or EMPTY
  local name = config.name
  if opts.on_token and not opts.on_event then
    opts = legacy_sink(opts)
  end

  if not config.available then
    local r = response.error(name, "unavailable", config.unavailable or (name .. " is not available"), 0,
      { model = config.model })
    r.metadata.attempts = { response.attempt(r) }
    metrics.started(name)
    return finish(name, r)
  end

  -- The operator's policy (the provider's, the orchestration's, a call's
  -- timeout), then the request's overrides on top.
  local base = policy.resolve(config.policy or policy.for_provider {
    timeout_ms = config.timeout_ms, connect_timeout_ms = config.connect_timeout_ms,
  }, opts.policy)
  if opts.timeout_ms then
    base = policy.resolve(base, { timeout_ms = opts.timeout_ms })
  end
  local pol = base
  if request.policy ~= nil then
    pol = policy.resolve(base, nil, request.policy) -- a fresh table
    pol.timeout_ms = opts.timeout_ms or pol.timeout_ms
  end
  -- A deadline the request made tighter than the operator's: its timeouts
  -- are the request's business, not the provider's health.
  local hurried = pol ~= base and policy.tightens(base, pol)
  local t0 = now()
  local attempts = {}
  local r
  local dep = config.stats
  local bkey = dep and config.breaker_key or name -- a deployment's breaker is its own
  for n = 1, pol.max_attempts do
    local allowed, why, asked_ms = breaker.allow(bkey)
    if not allowed then
      metrics.count(name, "skipped")
      if r then
        attempts[#attempts].note = "provider cooling down"
        break -- the last failure stands
      end
      -- A pause the provider asked for: its rest, as Retry-After seconds.
      r = response.error(name, "cooldown", why, 0,
        { model = config.model, retry_after = asked_ms and ceil(asked_ms / 1000) or nil })
      attempts[1] = response.attempt(r)
      break
    end
    local emitted
    local trial = why == "trial"
    r, emitted = attempt(adapter, config, request, opts, pol, trial, orch, dep)
    local m = r.metadata
    attempts[n] = response.attempt(r)
    if hurried and m.error_kind == "timeout" then
      breaker.release(bkey, trial)
    else
      breaker.record(bkey, pol, r.status == "success", m.error_kind, m.retry_after, trial)
    end
    if dep then -- (aiorch.deployments is loaded: it made config.stats)
      local deployments = require "aiorch.deployments"
      deployments.observe(dep, r.latency_ms, r.status ~= "success" and policy.counts_as_failure(m.error_kind))
      deployments.spent(dep, m.usage)
    end
    if r.status == "success" or emitted or n == pol.max_attempts
      or not policy.retryable(m.error_kind, m.http_status) then
      break
    end
    local wait = policy.backoff_ms(pol, n, m.retry_after)
    if now() - t0 + wait > pol.retry_budget_ms then
      attempts[n].note = "retry budget spent"
      break
    end
    metrics.count(name, "retries")
    if log.enabled("debug") then
      log.debug("%s: %s, attempt %d in %d ms", name, m.error_kind, n + 1, floor(wait))
    end
    sleep(wait)
  end
  local m = r.metadata
  m.attempts = attempts
  if #attempts > 1 then
    r.latency_ms = floor(now() - t0 + 0.5) -- the caller waited for all of them
    m.cost_usd = total_cost(attempts, m.cost_usd)
  end
  return r
end

_M.scrub = scrub

return _M
