-- headroom: where the remaining quota is largest, by the rate-limit headers
-- of each deployment's last answer (OpenAI's x-ratelimit-remaining-requests
-- and -tokens, Anthropic's anthropic-ratelimit-*): the requests it may
-- still take, or, when fewer, its tokens left over the tokens a call of it
-- uses, less its calls in flight. A window that has reset since counts as
-- full; a deployment that told nothing yet goes first (to learn). Among
-- equals, the one chosen least so far, by weight.
local DEFAULT_TOKENS_PER_CALL = 1000
local huge = math.huge

return function(_, providers, ctx)
  local t = ctx.now()
  local headroom = ctx.headroom
  return ctx.balance(providers, function(list)
    local best, best_room, best_picks
    for i = 1, #list do
      local d = list[i]
      local req, tok = headroom(d, t)
      local room = huge
      if req then
        room = req - d.inflight
      end
      if tok then
        local by_tokens = tok / (d.tokens_per_call or DEFAULT_TOKENS_PER_CALL) - d.inflight
        if by_tokens < room then
          room = by_tokens
        end
      end
      local picks = d.picks / d.weight
      if not best or room > best_room or (room == best_room and picks < best_picks) then
        best, best_room, best_picks = d, room, picks
      end
    end
    best.picks = best.picks + 1
    return best
  end)
end
