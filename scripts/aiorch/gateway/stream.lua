-- Streaming through a strategy.
--
-- The first provider to send a content token owns the client's stream; any
-- other provider's tokens are dropped. Two gateway strategies, written
-- against ctx only, make that useful:
--   fallback (and single): a provider that fails before its first token
--     hands over to the next; one that fails after it ends the stream.
--   fastest: every provider streams at once; the first token wins and the
--     others are cancelled (their transfers aborted) right then.
-- Other strategies (parallel, user ones) run unstreamed; the gateway then
-- sends their answer as a stream.
--
-- Tokens come from the HTTP client's on_event. It may yield, so a token is
-- written at once, and a slow client (res:write yields under backpressure)
-- holds the upstream transfer back instead of growing a buffer: while
-- on_event waits, aiorch.http pauses the transfer once 256 KiB of events
-- are queued. Where the caller cannot yield, a writer task drains the queue
-- instead, in order.
local aiorch = require "aiorch"
local loader = require "aiorch.loader"
local orchestrate = require "aiorch.orchestrate"
local response = require "aiorch.response"

local type = type
local ipairs = ipairs
local setmetatable = setmetatable
local concat = table.concat
local floor = math.floor
local spawn = aiorch.spawn
local current = aiorch.current
local isyieldable = coroutine.isyieldable
local add_response_attempts = response.add_attempts

local _M = {}

-- The gateway's strategy files live in gateway/strategies/, found through
-- the loader's path (searched before user directories).
local HERE = debug.getinfo(1, "S").source:match("^@(.*)/[^/]*$") or "."
_M.dir = HERE
_M.strategy_name = "gateway_stream"

-- Which built-in strategies stream, and how.
local MODES = { single = "single", fallback = "fallback", fastest = "fastest" }

-- jobs[task] = the session (the streaming job) of the orchestration
-- running in that task.
local jobs = setmetatable({}, { __mode = "k" })

function _M.job_of(task)
  return jobs[task]
end

-- The mode a strategy name streams with, or nil when it runs unstreamed
-- (a user file that replaces a built-in keeps its own behaviour).
function _M.mode(name, path)
  local mode = MODES[name]
  if not mode then
    return nil
  end
  local file = loader.find("strategy", name, path)
  if file ~= loader.root() .. "/strategies/" .. name .. ".lua" then
    return nil
  end
  return mode
end

------------------------------------------------------------------------------
-- The writer

local Session = {}
Session.__index = Session

-- res: the server response; shape: a Stream of gateway/openai or anthropic;
-- headers: the response headers (X-Aiorch-Provider is added on commit).
-- The session is also the streaming job of its orchestration (mode,
-- owner, on_token, on_owner): one table per stream, thousands at once.
function _M.session(res, shape, headers)
  return setmetatable({ res = res, shape = shape, headers = headers, queue = nil, qn = 0,
                        committed = false, sent = false, gone = false, closed = false, draining = false, writer = nil,
                        mode = nil, owner = nil, on_token = nil, on_owner = nil }, Session)
end

-- Writes first (when given), then what was queued meanwhile, in order.
local function drain(s, first)
  s.draining = true
  local chunk = first
  while not s.gone do
    if chunk == nil then
      local n = s.qn
      if n == 0 then
        break
      end
      local q = s.queue
      chunk = n == 1 and q[1] or concat(q, "", 1, n)
      s.queue, s.qn = nil, 0
    end
    if not s.sent then
      s.sent = true
      s.res:start(200, s.headers)
    end
    if not s.res:write(chunk) then
      s.gone = true
    end
    chunk = nil
  end
  s.draining = false
  s.writer = nil
end

function Session:push(bytes)
  if self.qn == 0 and not (self.draining or self.writer) and isyieldable() then
    return drain(self, bytes) -- nothing waits before it: no queue
  end
  local n = self.qn + 1
  local q = self.queue
  if not q then
    q = {}
    self.queue = q
  end
  q[n] = bytes
  self.qn = n
  if not (self.draining or self.writer) then
    self.writer = spawn(drain, self)
  end
end

-- The stream is now provider's: the headers name it and the start events go out.
function Session:commit(provider, n)
  self.committed = true
  self.headers["x-aiorch-provider"] = provider
  self:push(self.shape:start(n))
end

-- Waits until every queued byte is written (or the client is gone).
function Session:flush()
  local w = self.writer
  if w then
    w:await()
  end
  if self.qn > 0 then
    drain(self)
  end
end

-- Ends the stream with the given last bytes.
function Session:close(bytes)
  self:flush()
  if self.gone or self.closed then
    return
  end
  self.closed = true
  if not self.sent then
    self.sent = true
    self.res:start(200, self.headers)
  end
  self.res:finish(bytes)
end

------------------------------------------------------------------------------
-- The strategies (run by gateway/strategies/gateway_stream.lua)

local function add_attempts(attempts, p, r)
  if r then
    return add_response_attempts(attempts, r)
  end
  attempts[#attempts + 1] = { provider = p, status = "cancelled" }
  return attempts
end

local function failed_all(ctx, failures, attempts, t0)
  local e = ctx.all_failed(failures)
  e.metadata.attempts = attempts
  e.latency_ms = floor(ctx.now() - t0 + 0.5)
  return e
end

local function fallback(providers, ctx, job)
  local t0 = ctx.now()
  local attempts, failures = {}, nil
  local last = job.mode == "single" and 1 or #providers
  for i = 1, last do
    local p = providers[i]
    if i > 1 then
      ctx.count(p, "fallback_activations")
      ctx.log("info", "falling back to %s", p)
    end
    local r = ctx.call(p, { stream = true, on_token = job.on_token })
    add_attempts(attempts, p, r)
    if r.status == "success" then
      r.metadata.attempts = attempts
      return r
    end
    if job.owner == p then
      -- A failure after the first token ends the stream, unless the policy
      -- lets the next provider continue the answer from where it stopped.
      local partial, nextp = r.metadata.partial_text, i < last and providers[i + 1] or nil
      if partial and nextp and ctx.policy(p).continue_on_cut then
        ctx.count(nextp, "continuations")
        ctx.log("info", "%s was cut; %s continues the answer", p, nextp)
        job.owner = nextp
        r = ctx.continue_with(nextp, partial, p, { stream = true, on_token = job.on_token })
        add_attempts(attempts, nextp, r)
      end
      r.metadata.attempts = attempts
      return r
    end
    failures = failures or {}
    failures[#failures + 1] = r
  end
  return failed_all(ctx, failures, attempts, t0)
end

local function fastest(providers, ctx, job)
  local t0 = ctx.now()
  local tasks, results = {}, {}
  job.on_owner = function(owner)
    for i, t in ipairs(tasks) do
      if providers[i] ~= owner then
        ctx.cancel(t)
      end
    end
  end
  for i, p in ipairs(providers) do
    tasks[i] = ctx.spawn(function()
      local r = ctx.call(p, { stream = true, on_token = job.on_token })
      results[i] = r
      return r
    end)
  end
  local winner, index = ctx.first(tasks, function(r)
    return type(r) == "table" and (r.status == "success" or r.ia_provider_name == job.owner)
  end)
  local attempts = {}
  for i, p in ipairs(providers) do
    add_attempts(attempts, p, results[i])
  end
  if winner then
    for i, p in ipairs(providers) do
      ctx.count(p, i == index and "races_won" or "races_lost")
    end
    winner.metadata.attempts = attempts
    return winner
  end
  local failures = {}
  for i, p in ipairs(providers) do
    ctx.count(p, "races_lost")
    failures[i] = results[i] or ctx.error_response(p, "internal", "no response")
  end
  return failed_all(ctx, failures, attempts, t0)
end

_M.strategies = { single = fallback, fallback = fallback, fastest = fastest }

------------------------------------------------------------------------------
-- Running one streamed orchestration

-- The gateway's directory, then the user's: one table per user path, so
-- that the loader's per-path memo hits.
local paths = setmetatable({}, { __mode = "k" })
local no_user_path = { HERE }

local function search_path(user)
  if user == nil then
    return no_user_path
  end
  local p = type(user) == "table" and paths[user]
  if p then
    return p
  end
  p = { HERE }
  if type(user) == "table" then
    for _, d in ipairs(user) do
      p[#p + 1] = d
    end
    paths[user] = p
  else
    p[2] = user
  end
  return p
end

-- Runs request through strategy `mode` with tokens going to session s.
-- opts: as for orchestrate (env, path, timeout_ms). Returns what
-- orchestrate returns; s.committed says whether tokens went out.
function _M.run(request, mode, providers, s, opts)
  s.mode = mode
  s.on_token = function(text, provider)
    if s.owner == nil then
      s.owner = provider
      -- The losers go before anything is written (a write may yield).
      if s.on_owner then
        s.on_owner(provider)
      end
      s:commit(provider)
    end
    if provider == s.owner then
      s:push(s.shape:delta(text))
    end
  end
  local task = current()
  jobs[task] = s
  local o = { env = opts.env, path = search_path(opts.path), stream = true, timeout_ms = opts.timeout_ms }
  local r, kind, err = orchestrate.orchestrate(request, _M.strategy_name, providers, o)
  jobs[task] = nil
  return r, kind, err, s.owner
end

return _M
