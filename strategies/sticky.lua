-- sticky: the same conversation goes to the same deployment, so that the
-- provider's prompt cache stays warm there. The key is the request's
-- X-Aiorch-Sticky-Key header (ctx.sticky_key()), else its `user`, else the
-- conversation's prefix: its messages up to the first user message (the
-- system prompt and the question that opened it), at most PREFIX_MAX bytes
-- of each. Deployments are ranked by rendezvous hashing (highest random
-- weight, weighted): when one leaves (cools down, is at its rate limit, is
-- removed), only its own conversations move, each to its second choice,
-- and they come back when it returns.
local PREFIX_MAX = 4096
local CACHE_MAX = 4096

local unpack = string.unpack
local log = math.log
local type = type

-- 64-bit hashes of strings, kept while there are few (keys repeat).
local cache, cached = {}, 0

local function mix(x)
  x = (x ~ (x >> 30)) * -4658895280553007687 -- 0xbf58476d1ce4e5b9
  x = (x ~ (x >> 27)) * -7723592293110705685 -- 0x94d049bb133111eb
  return x ~ (x >> 31)
end

local function hash(s)
  local h = cache[s]
  if h then
    return h
  end
  local n = #s
  if n > PREFIX_MAX then
    n = PREFIX_MAX
  end
  h = n
  local i = 1
  while i + 7 <= n do
    h = mix(h ~ unpack("<i8", s, i))
    i = i + 8
  end
  if i <= n then
    h = mix(h ~ unpack("<i" .. (n - i + 1), s, i))
  end
  if cached >= CACHE_MAX then
    cache, cached = {}, 0
  end
  cache[s], cached = h, cached + 1
  return h
end

local function text_of(content)
  if type(content) == "string" then
    return content
  end
  local first = type(content) == "table" and content[1]
  return type(first) == "table" and type(first.text) == "string" and first.text or ""
end

-- The hash of what keeps a conversation together.
local function key_hash(request, ctx)
  local key = ctx.sticky_key() or request.user
  if type(key) == "string" and key ~= "" then
    return hash(key)
  end
  local h = 0
  local msgs = request.messages
  if type(msgs) == "table" then
    for i = 1, #msgs do
      local m = msgs[i]
      local text = m.content
      if type(text) ~= "string" then
        text = text_of(text)
      end
      -- mix(h ~ hash(text)), with the hash from the cache inline (the keys repeat)
      local x = h ~ (cache[text] or hash(text))
      x = (x ~ (x >> 30)) * -4658895280553007687
      x = (x ~ (x >> 27)) * -7723592293110705685
      h = x ~ (x >> 31)
      if m.role == "user" then
        break
      end
    end
  else
    h = mix(hash(request.system_prompt or "") ~ hash(request.user_question or ""))
  end
  return h
end

-- Highest random weight: each deployment draws u in (0, 1) from the pair
-- (key, deployment), and the largest -weight / ln(u) wins (weighted
-- rendezvous hashing). As -ln(u) >= 1 - u, weight / (1 - u) bounds the
-- score from above: the logarithm is taken only of a draw that may win.
-- h: the key's hash.
local function pick(list, h)
  local best, best_score = nil, -1
  for i = 1, #list do
    local d = list[i]
    local x = d.hash
    if not x then
      x = hash(d.id)
      d.hash = x
    end
    -- mix(h ~ x), inline
    x = h ~ x
    x = (x ~ (x >> 30)) * -4658895280553007687
    x = (x ~ (x >> 27)) * -7723592293110705685
    local u = (((x ~ (x >> 31)) >> 11) + 0.5) / 9007199254740992
    local w = d.weight
    if w / (1 - u) > best_score then
      local score = -w / log(u)
      if score > best_score then
        best, best_score = d, score
      end
    end
  end
  return best
end

return function(request, providers, ctx)
  local h = key_hash(request, ctx)
  -- (a pick may run again after a failed call: by then another request
  -- may be placed, so h stays this one's)
  return ctx.balance(providers, function(list)
    return pick(list, h)
  end)
end
