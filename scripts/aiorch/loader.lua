-- Finds strategies, provider adapters and prompt builders by name on the
-- search path: --path dirs, then AIORCH_PATH dirs, then the built-in root.
local fmt = string.format
local type = type
local pairs = pairs
local ipairs = ipairs
local pcall = pcall
local loadfile = loadfile
local io_open = io.open
local io_popen = io.popen
local os_getenv = os.getenv
local sort = table.sort
local concat = table.concat

local _M = {}

local KINDS = {
  strategy = { user = "strategies", builtin = "strategies", label = "strategy" },
  provider = { user = "providers", builtin = "scripts/providers", label = "provider" },
  prompt = { user = "prompts", builtin = "scripts/prompts", label = "prompt builder" },
}

local function core_field(name)
  local ok, core = pcall(require, "aiorch")
  if ok and type(core) == "table" then
    return core[name]
  end
  return nil
end

-- ROOT holds scripts/ and strategies/. The runtime says where; a plain
-- lua5.4 host falls back to this file's location (ROOT/scripts/aiorch/).
local function default_root()
  local root = core_field("root")
  if type(root) == "string" and root ~= "" then
    return root
  end
  local src = debug.getinfo(1, "S").source
  local dir = src:match("^@(.*)/scripts/aiorch/[^/]*$")
  return dir or "."
end

local extra_dirs = {}
local dirs_cache = {} -- kind .. extra -> search dirs; the path is fixed per runtime
local found = {} -- positive lookups only, so a new user file is seen at once
-- The hot path: extra (a path table or string, or false) -> kind -> name -> value.
local memo = setmetatable({}, { __mode = "k" })

function _M.root()
  return default_root()
end

local function split(list, out)
  out = out or {}
  if type(list) == "table" then
    for _, d in ipairs(list) do
      split(d, out)
    end
  elseif type(list) == "string" then
    for d in list:gmatch("[^:]+") do
      out[#out + 1] = (d:gsub("/+$", ""))
    end
  end
  return out
end

-- Directories added by the command line (--path), searched before AIORCH_PATH.
function _M.add_path(dirs)
  split(dirs, extra_dirs)
  dirs_cache = {}
  found = {}
  memo = setmetatable({}, { __mode = "k" })
end

function _M.reset_path()
  extra_dirs = {}
  dirs_cache = {}
  found = {}
  memo = setmetatable({}, { __mode = "k" })
end

-- The user directories in search order: extra (a ':'-list or a list),
-- --path dirs, then AIORCH_PATH.
function _M.user_dirs(extra)
  local dirs = split(extra)
  for _, d in ipairs(extra_dirs) do
    dirs[#dirs + 1] = d
  end
  local up = core_field("user_path")
  if up == nil then
    up = os_getenv("AIORCH_PATH")
  end
  return split(up, dirs)
end

local function cache_key(kind, extra)
  if extra == nil then
    return kind
  elseif type(extra) == "string" then
    return kind .. "\0" .. extra
  end
  local ok, s = pcall(concat, extra, ":")
  return ok and kind .. "\0" .. s or nil
end

function _M.search_dirs(kind, extra)
  local k = KINDS[kind]
  if not k then
    error(fmt("unknown kind '%s'", tostring(kind)), 2)
  end
  local ck = cache_key(kind, extra)
  local cached = ck and dirs_cache[ck]
  if cached then
    return cached
  end
  local out = {}
  for _, d in ipairs(_M.user_dirs(extra)) do
    out[#out + 1] = d .. "/" .. k.user
  end
  out[#out + 1] = _M.root() .. "/" .. k.builtin
  if ck then
    dirs_cache[ck] = out
  end
  return out
end

local function exists(path)
  local f = io_open(path, "r")
  if f then
    f:close()
    return true
  end
  return false
end

local function list_dir(dir, names)
  local ok, lfs = pcall(require, "lfs")
  if ok and type(lfs) == "table" and lfs.dir then
    local iok, iter, state = pcall(lfs.dir, dir)
    if iok then
      for f in iter, state do
        local n = f:match("^([%w_%-]+)%.lua$")
        if n then
          names[n] = true
        end
      end
    end
    return
  end
  local p = io_popen("ls -1 '" .. dir:gsub("'", "'\\''") .. "' 2>/dev/null")
  if p then
    for f in p:lines() do
      local n = f:match("^([%w_%-]+)%.lua$")
      if n then
        names[n] = true
      end
    end
    p:close()
  end
end

-- Every name of this kind on the search path, sorted.
function _M.list(kind, extra)
  local names = {}
  for _, d in ipairs(_M.search_dirs(kind, extra)) do
    list_dir(d, names)
  end
  local out = {}
  for n in pairs(names) do
    out[#out + 1] = n
  end
  sort(out)
  return out
end


function _M.find(kind, name, extra)
  local k = KINDS[kind]
  if not k then
    error(fmt("unknown kind '%s'", tostring(kind)), 2)
  end
  if type(name) ~= "string" or not name:match("^[%w_%-]+$") then
    return nil, fmt("invalid %s name %s (letters, digits, '_' and '-' only)", k.label,
      type(name) == "string" and "'" .. name .. "'" or tostring(name))
  end
  local dirs = _M.search_dirs(kind, extra)
  local key = (cache_key(kind, extra) or concat(dirs, ":")) .. "\0" .. name
  local hit = found[key]
  if hit then
    return hit
  end
  for _, d in ipairs(dirs) do
    local path = d .. "/" .. name .. ".lua"
    if exists(path) then
      found[key] = path
      return path
    end
  end
  return nil, fmt("unknown %s '%s' (valid: %s)", k.label, name, concat(_M.list(kind, extra), ", "))
end

local SHAPES = {
  strategy = function(v)
    return type(v) == "function", "a function(request, providers, ctx)"
  end,
  provider = function(v)
    return type(v) == "table" and type(v.build_request) == "function" and type(v.parse_response) == "function",
      "a table with build_request and parse_response"
  end,
  prompt = function(v)
    return type(v) == "function" or (type(v) == "table" and type(v.build_system_prompt) == "function"),
      "a table with build_system_prompt"
  end,
}

local loaded = {} -- path -> value

-- Providers without a file of their own (aiorch.compat): those a gateway
-- configuration declares, by name, ahead of files; then, when no file has
-- the name, the presets (groq, mistral, ...).
local defined = {}

-- define(kind, name, value): value answers load(kind, name) from now on
-- (nil: forgets it).
function _M.define(kind, name, value)
  defined[kind .. "\0" .. name] = value
  memo = setmetatable({}, { __mode = "k" })
end

-- load(kind, name[, extra]) -> the value the file returns, or nil, message.
local function load_uncached(kind, name, extra)
  local d = type(name) == "string" and defined[kind .. "\0" .. name]
  if d then
    return d, "(configuration)"
  end
  local path, err = _M.find(kind, name, extra)
  if not path and kind == "provider" and type(name) == "string" then
    local preset = require("aiorch.compat").preset(name)
    if preset then
      return preset, "(preset)"
    end
  end
  if not path then
    return nil, err
  end
  local v = loaded[path]
  if v ~= nil then
    return v, path
  end
  local label = KINDS[kind].label
  local chunk, lerr = loadfile(path)
  if not chunk then
    return nil, fmt("cannot load %s '%s': %s", label, name, lerr)
  end
  local ok, value = pcall(chunk, name)
  if not ok then
    return nil, fmt("cannot load %s '%s': %s", label, name, tostring(value))
  end
  local good, shape = SHAPES[kind](value)
  if not good then
    return nil, fmt("%s '%s' (%s) must return %s", label, name, path, shape)
  end
  loaded[path] = value
  return value, path
end

-- Every request loads its strategy, adapters and prompt builder: once found,
-- a name costs two table lookups.
function _M.load(kind, name, extra)
  local by_kind = memo[extra or false]
  local hit = by_kind and by_kind[kind] and by_kind[kind][name]
  if hit ~= nil then
    return hit[1], hit[2]
  end
  local v, path = load_uncached(kind, name, extra)
  if v ~= nil and type(name) == "string" then
    by_kind = by_kind or {}
    memo[extra or false] = by_kind
    by_kind[kind] = by_kind[kind] or {}
    by_kind[kind][name] = { v, path }
  end
  return v, path
end

function _M.clear_cache()
  loaded = {}
  found = {}
  dirs_cache = {}
  memo = setmetatable({}, { __mode = "k" })
end

return _M
