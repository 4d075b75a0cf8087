-- JSON that keeps what the APIs' bodies say: `[]` stays an array, `{}` an
-- object, and integers keep every digit.
--
-- lua-cjson (Debian's 2.1.0) decodes both `[]` and `{}` to an empty table,
-- encodes every empty table as `{}` and every number with 14 significant
-- digits. For a tool's JSON Schema (`"required": []`) or a 19-digit seed
-- that loses information. So: cjson decodes a text that has neither an
-- empty array nor a long number (almost every body, and fast); dkjson
-- decodes the others, marking arrays and objects with the metatables
-- below; and encode writes tables by those marks (cjson still escapes the
-- strings). An empty table without a mark is an object.
--   local json = require "aiorch.json"
--   local v, err = json.decode(text)      -- nil, message on malformed JSON
--   local text = json.encode(v)           -- raises on a value JSON cannot hold
local cjson = require "cjson.safe"

local type = type
local tonumber = tonumber
local pcall = pcall
local next = next
local tostring = tostring
local getmetatable = getmetatable
local setmetatable = setmetatable
local fmt = string.format
local find = string.find
local concat = table.concat
local sort = table.sort
local math_type = math.type
local floor = math.floor
local huge = math.huge
local encode_string = cjson.encode

local _M = {}

_M.null = cjson.null
local array_mt = { __jsontype = "array" }
local object_mt = { __jsontype = "object" }
_M.array_mt, _M.object_mt = array_mt, object_mt

-- Marks t (default: a new table) as a JSON array, or as an object.
function _M.array(t)
  return setmetatable(t or {}, array_mt)
end

function _M.object(t)
  return setmetatable(t or {}, object_mt)
end

function _M.is_array(t)
  return getmetatable(t) == array_mt
end

local dkjson -- loaded on first need

-- Whether the text has an empty array: a "[" with only spaces before
-- the next "]" (found with plain searches: most bodies have few "[").
local function empty_array(s)
  local i = find(s, "[", 1, true)
  while i do
    if find(s, "^%s*%]", i + 1) then
      return true
    end
    i = find(s, "[", i + 1, true)
  end
  return false
end

local BIG = 2 ^ 53

-- Whether a table cjson decoded holds a number it may have cut: beyond
-- 2^53 a double no longer keeps every digit of an integer. (Looking at
-- the decoded values is cheaper than scanning every byte of the text;
-- only tables are recursed into, numbers are looked at in the loop.)
local function big_number(t, depth)
  if depth > 64 then
    return true -- let dkjson, which is exact, decode it
  end
  for _, x in next, t do
    local tx = type(x)
    if tx == "number" then
      if x >= BIG or x <= -BIG then
        return true
      end
    elseif tx == "table" and big_number(x, depth + 1) then
      return true
    end
  end
  return false
end

-- decode(text) -> value, or nil, message.
function _M.decode(s)
  if type(s) ~= "string" then
    return nil, "not a string"
  end
  if not empty_array(s) then
    local v, err = cjson.decode(s)
    local tv = type(v)
    if tv == "table" then
      if not big_number(v, 0) then
        return v
      end
    elseif tv ~= "number" or (v < BIG and v > -BIG) then
      return v, err
    end
  end
  dkjson = dkjson or require "dkjson"
  local v, _, err = dkjson.decode(s, 1, cjson.null, object_mt, array_mt)
  if err then
    return nil, err
  end
  return v
end

-- decode_plain(text) -> value, or nil, message: cjson alone, for a
-- document whose empty arrays nobody writes back (an answer whose parts
-- are read, not relayed as JSON): [] comes back as an empty table.
function _M.decode_plain(s)
  if type(s) ~= "string" then
    return nil, "not a string"
  end
  return cjson.decode(s)
end

local encode_value

-- "key": and ,"key": as JSON, for the few keys that repeat: quoted once.
-- Bounded: emptied when full; long keys are not kept.
local key_texts, next_key_texts, n_keys = {}, {}, 0
local function key_text(k, first)
  local hit = first and key_texts[k] or next_key_texts[k]
  if hit then
    return hit
  end
  local text = encode_string(k) .. ":"
  if #k <= 64 then
    if n_keys >= 512 then
      key_texts, next_key_texts, n_keys = {}, {}, 0
    end
    key_texts[k], next_key_texts[k] = text, "," .. text
    n_keys = n_keys + 1
  end
  return first and text or "," .. text
end

local scratch = {} -- depth -> a list of keys (encode never yields: one at a time)

local function encode_table(t, out, n, depth)
  if depth > 64 then
    error("json.encode: nested deeper than 64", 0)
  end
  local mt = getmetatable(t)
  local len = #t
  if mt == array_mt or (mt ~= object_mt and len > 0) then
    out[n + 1] = "["
    n = n + 1
    for i = 1, len do
      if i > 1 then
        n = n + 1
        out[n] = ","
      end
      n = encode_value(t[i], out, n, depth + 1)
    end
    n = n + 1
    out[n] = "]"
    return n
  end
  -- The keys, sorted (the same table gives the same text), in a list
  -- kept per depth and emptied after use (one that an encode left filled,
  -- raising on the way, is replaced).
  local keys = scratch[depth]
  if not keys or keys[1] ~= nil then -- (left filled by an encode that raised)
    keys = {}
    scratch[depth] = keys
  end
  local nk = 0
  for k in next, t do
    if type(k) ~= "string" then
      for i = 1, nk do
        keys[i] = nil
      end
      error(fmt("json.encode: an object key must be a string (got %s)", type(k)), 0)
    end
    nk = nk + 1
    keys[nk] = k
  end
  if nk > 1 then
    sort(keys)
  end
  n = n + 1
  out[n] = "{"
  local texts = key_texts
  for i = 1, nk do
    local k = keys[i]
    n = n + 1
    out[n] = texts[k] or key_text(k, i == 1)
    texts = next_key_texts
    local x = t[k]
    if type(x) == "string" then -- most values: no call
      n = n + 1
      out[n] = encode_string(x)
    else
      n = encode_value(x, out, n, depth + 1)
    end
  end
  for i = 1, nk do
    keys[i] = nil
  end
  n = n + 1
  out[n] = "}"
  return n
end

function encode_value(v, out, n, depth)
  local tv = type(v)
  n = n + 1
  if tv == "string" then
    out[n] = encode_string(v)
  elseif tv == "number" then
    if math_type(v) == "integer" then
      out[n] = fmt("%d", v)
    elseif v ~= v or v == huge or v == -huge then
      error("json.encode: NaN and infinities have no JSON form", 0)
    elseif v == floor(v) and v > -BIG and v < BIG then
      out[n] = fmt("%d", v)
    else
      local short = fmt("%.15g", v) -- 0.1, not 0.10000000000000001
      out[n] = tonumber(short) == v and short or fmt("%.17g", v)
    end
  elseif tv == "boolean" then
    out[n] = v and "true" or "false"
  elseif v == cjson.null then
    out[n] = "null"
  elseif tv == "table" then
    return encode_table(v, out, n - 1, depth)
  else
    error(fmt("json.encode: a %s has no JSON form", tv), 0)
  end
  return n
end

-- encode(value) -> text. Raises on NaN, infinities, functions and the like.
function _M.encode(v)
  -- (sized for a small body at once: the nils make the list's room)
  local out = { nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil, nil }
  local n = encode_value(v, out, 0, 0)
  return concat(out, "", 1, n)
end

-- A string as JSON text (a value that is not a string is first made one).
function _M.quote(s)
  return encode_string(tostring(s or ""))
end

-- quote for the few values that repeat (models, finish reasons): quoted
-- once. Bounded: emptied when full; long strings are not kept.
local quoted, n_quoted = {}, 0
function _M.word(s)
  local hit = quoted[s]
  if hit then
    return hit
  end
  local out = _M.quote(s)
  if type(s) == "string" and #s <= 128 then
    if n_quoted >= 256 then
      quoted, n_quoted = {}, 0
    end
    quoted[s] = out
    n_quoted = n_quoted + 1
  end
  return out
end

-- Like encode, but returns nil, message instead of raising.
function _M.encode_safe(v)
  local ok, s = pcall(_M.encode, v)
  if not ok then
    return nil, tostring(s)
  end
  return s
end

return _M
