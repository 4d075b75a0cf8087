-- The jobs of the C API (aiorch_job_submit_*, src/job.c).
--   run(finish, fn, ...)   runs fn(...) as a task of its own and hands its
--                          outcome to finish(true, json) or finish(false, kind, message)
--   orchestrate(emit, request_json, strategy, providers)
--                          the body of an orchestration job; emit(json) gets
--                          each stream event when the host asked for them
local core = require "aiorch"
local json = require "aiorch.json"
local orchestrate = require "aiorch.orchestrate"
local response = require "aiorch.response"

local type = type
local pairs = pairs
local pcall = pcall
local tostring = tostring
local pack = table.pack

local _M = {}

-- fn runs as a child task: a raise, a spent instruction budget or a cancel
-- ends the child, and this task (with a budget of its own) reports it.
function _M.run(finish, fn, ...)
  local r = pack(core.spawn(fn, ...):await())
  local value, kind, message = r[1], r[2], r[3]
  if value == nil and type(kind) == "string" then -- "error", "cancelled" or the job's own
    return finish(false, kind, tostring(message or kind))
  end
  if value == nil then
    return finish(true, "null")
  end
  -- StandardAIResponses as aiorch writes them everywhere (what is kept
  -- beside a response, such as the upstream's raw bytes, stays out).
  local encode = (response.is_response(value) or (type(value) == "table" and response.is_response(value[1])))
    and response.encode or json.encode
  local ok, text = pcall(encode, value)
  if not ok then
    return finish(false, "encode", "the job's result has no JSON form: " .. tostring(text))
  end
  return finish(true, text)
end

-- An event as the host sees it: the canonical event (without the upstream
-- event it came from) and the provider that sent it.
local function event_json(ev, provider)
  local out = {}
  for k, v in pairs(ev) do
    if k ~= "raw" then
      out[k] = v
    end
  end
  out.provider = provider
  return json.encode(out)
end

function _M.orchestrate(emit, request_json, strategy, providers)
  local request, err = json.decode(request_json)
  if type(request) ~= "table" or json.is_array(request) then
    return nil, "invalid", "request: " .. (err and ("malformed JSON: " .. tostring(err)) or "not a JSON object")
  end
  local opts = {}
  if emit then
    opts.stream = true
    opts.on_event = function(ev, provider)
      emit(event_json(ev, provider))
    end
  end
  return orchestrate.orchestrate(request, strategy, providers, opts)
end

return _M
