-- The secrets this process knows (provider keys; the gateway may add its
-- client keys), and scrub(text): text with every one of them removed, also
-- when it is echoed transformed. Upstream error text goes through it before
-- it reaches a client, a log or a metric.
--
-- Removed, each replaced by "[redacted]":
--   * any run of 8 or more characters found inside a secret (the whole
--     secret, or a piece: cut in the middle, split across two fields);
--     a secret shorter than 8 characters (at least 4), whole;
--   * the same once percent-encoding (%2D) and JSON escapes (\u002d, \/)
--     are decoded;
--   * a masked secret: a prefix and/or suffix of one around mask
--     characters (* . … •), "sk-...abcd" or "sk-abc*****wxyz", when the
--     prefix and suffix shown add up to 4 characters or more.
local fmt = string.format
local byte, char, sub = string.byte, string.char, string.sub
local concat, sort = table.concat, table.sort
local type = type
local ipairs = ipairs
local tonumber = tonumber
local setmetatable = setmetatable
local huge = math.huge

local _M = {}

_M.REDACTED = "[redacted]"

local GRAM = 8       -- a piece this long of a secret is a secret
-- Any piece of GRAM bytes holds a STEP-aligned one of PROBE bytes (PROBE +
-- STEP - 1 <= GRAM): the text is probed every STEP bytes, and only a hit
-- looks at the GRAM-byte pieces around it.
local PROBE, STEP = 5, 4
local SHORTEST = 4   -- shorter secrets are ignored: they would redact words
local SHOWN = 4      -- a masked form showing this many of its characters is redacted
local LONGEST_AFFIX = 64

-- Adds what scrub looks for of the secret s to the matcher m.
local function extend(m, s)
  if #s >= GRAM then
    for i = 1, #s - GRAM + 1 do
      m.grams[sub(s, i, i + GRAM - 1)] = true
    end
    for i = 1, #s - PROBE + 1 do
      m.probes[sub(s, i, i + PROBE - 1)] = true
    end
  else
    m.whole[#m.whole + 1] = s
  end
  local n = #s < LONGEST_AFFIX and #s or LONGEST_AFFIX
  for k = 1, n do
    m.prefixes[sub(s, 1, k)] = true
    m.suffixes[sub(s, -k)] = true
  end
  if n > m.affix then
    m.affix = n
  end
end

local function compile(secrets)
  local m = { grams = {}, probes = {}, whole = {}, prefixes = {}, suffixes = {}, affix = 0 }
  for _, s in ipairs(secrets) do
    extend(m, s)
  end
  return m
end

-- The most secrets kept (a process that registers a key per request, say);
-- past it the oldest goes. A call registers its own key before it scrubs.
_M.max = 4096

-- The registry: each secret once, oldest first, and its matcher (nil: to build).
local known, list, matcher = {}, {}, nil

-- Registers a secret (a string of at least 4 bytes; anything else is ignored).
function _M.add(secret)
  if type(secret) ~= "string" or #secret < SHORTEST or known[secret] then
    return
  end
  known[secret] = true
  list[#list + 1] = secret
  if #list > _M.max then
    while #list > _M.max do
      known[table.remove(list, 1)] = nil
    end
    matcher = nil
  elseif matcher then
    extend(matcher, secret)
  end
end

-- How many secrets are registered (never which).
function _M.count()
  return #list
end

local MASK_UTF8 = { ["\226\128\166"] = true, ["\226\128\162"] = true } -- … •

-- The text with percent-encoding and JSON escapes decoded (and … •
-- written *), with each decoded character's first and last source byte.
local function decode(s)
  local out, from, to = {}, {}, {}
  local i, n = 1, #s
  while i <= n do
    local c, j = sub(s, i, i), i
    if c == "%" and s:find("^%x%x", i + 1) then
      c, j = char(tonumber(sub(s, i + 1, i + 2), 16)), i + 2
    elseif c == "\\" then
      local nx = sub(s, i + 1, i + 1)
      if nx == "u" and s:find("^%x%x%x%x", i + 2) and tonumber(sub(s, i + 2, i + 5), 16) < 128 then
        c, j = char(tonumber(sub(s, i + 2, i + 5), 16)), i + 5
      elseif nx == "/" or nx == "\\" or nx == '"' then
        c, j = nx, i + 1
      end
    elseif byte(c) == 226 and MASK_UTF8[sub(s, i, i + 2)] then
      c, j = "*", i + 2
    end
    out[#out + 1] = c
    from[#from + 1] = i
    to[#to + 1] = j
    i = j + 1
  end
  return concat(out), from, to
end

-- Adds to marks the source ranges of what m finds in the view t (from and
-- to map its characters to source bytes; nil: t is the source).
local function find_in(m, t, from, to, marks)
  local function mark(a, b)
    marks[#marks + 1] = { from and from[a] or a, to and to[b] or b }
  end
  local grams, probes = m.grams, m.probes
  local n = #t
  for q = 1, n - PROBE + 1, STEP do
    if probes[sub(t, q, q + PROBE - 1)] then
      local lo = q - (GRAM - PROBE)
      for k = lo < 1 and 1 or lo, q do
        if k + GRAM - 1 <= n and grams[sub(t, k, k + GRAM - 1)] then
          mark(k, k + GRAM - 1)
        end
      end
    end
  end
  for _, s in ipairs(m.whole) do
    local a, b = t:find(s, 1, true)
    while a do
      mark(a, b)
      a, b = t:find(s, b + 1, true)
    end
  end
  -- Masked: a run of mask characters (three or more, or with a *) with a
  -- secret's prefix before it, its suffix after it.
  if not (t:find("*", 1, true) or t:find("...", 1, true)) then
    return
  end
  local prefixes, suffixes, affix = m.prefixes, m.suffixes, m.affix
  local a, last = t:find("[%*%.]+")
  local star = 0 -- the next * at or after a (huge: none)
  while a do
    local b = last + 1
    if star < a then
      star = t:find("*", a, true) or huge
    end
    if b - a >= 3 or star <= last then
      local before, after = 0, 0
      for k = 1, (a - 1 < affix and a - 1 or affix) do
        if prefixes[sub(t, a - k, a - 1)] then
          before = k
        end
      end
      for k = 1, affix do
        if b + k - 1 > #t then
          break
        end
        if suffixes[sub(t, b, b + k - 1)] then
          after = k
        end
      end
      if before + after >= SHOWN then
        mark(a - before, b + after - 1)
      end
    end
    a, last = t:find("[%*%.]+", b)
  end
end

local function scrub_with(m, text)
  local marks = {}
  find_in(m, text, nil, nil, marks)
  if text:find("[%%\\\226]") then
    local t, from, to = decode(text)
    if t ~= text then
      find_in(m, t, from, to, marks)
    end
  end
  if #marks == 0 then
    return text
  end
  sort(marks, function(x, y) return x[1] < y[1] end)
  local out, pos = {}, 1
  local a, b = marks[1][1], marks[1][2]
  for i = 2, #marks + 1 do
    local r = marks[i]
    if r and r[1] <= b + 1 then
      if r[2] > b then
        b = r[2]
      end
    else
      out[#out + 1] = sub(text, pos, a - 1)
      out[#out + 1] = _M.REDACTED
      pos = b + 1
      if r then
        a, b = r[1], r[2]
      end
    end
  end
  out[#out + 1] = sub(text, pos)
  return concat(out)
end

local compiled = setmetatable({}, { __mode = "k" }) -- list -> matcher

-- scrub(text[, secrets]): text (tostring'd) with every registered secret
-- removed, or with those of the list secrets.
function _M.scrub(text, secrets)
  text = type(text) == "string" and text or fmt("%s", text)
  local m
  if secrets then
    m = compiled[secrets]
    if not m then
      local ok = {}
      for _, s in ipairs(secrets) do
        if type(s) == "string" and #s >= SHORTEST then
          ok[#ok + 1] = s
        end
      end
      m = compile(ok)
      compiled[secrets] = m
    end
  else
    if #list == 0 then
      return text
    end
    m = matcher or compile(list)
    matcher = m
  end
  return scrub_with(m, text)
end

return _M
