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
  return ctx.balance(providers, function(list)
    -- (below any room: the first deployment is the best so far)
    local best, best_room, best_picks = nil, -huge, huge
    for i = 1, #list do
      local d = list[i]
      -- (ctx.headroom(d, t), inline: this runs for every deployment)
      local inflight = d.inflight
      local room = huge
      local req = d.requests_remaining
      if req then
        local reset = d.requests_reset_at
        if reset and t >= reset then
          req = d.requests_limit or huge
        end
        room = req - inflight
      end
      local tok = d.tokens_remaining
      if tok then
        local reset = d.tokens_reset_at
        if reset and t >= reset then
          tok = d.tokens_limit or huge
        end
        local by_tokens = tok / (d.tokens_per_call or DEFAULT_TOKENS_PER_CALL) - inflight
        if by_tokens < room then
          room = by_tokens
        end
      end
      if room >= best_room then
        local picks = d.picks / d.weight
        if room > best_room or picks < best_picks then
          best, best_room, best_picks = d, room, picks
        end
      end
    end
    best = best or list[1] -- (no room was a number)
    best.picks = best.picks + 1
    return best
  end)
end
