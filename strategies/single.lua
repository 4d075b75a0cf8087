-- single: call the one named provider (the first chosen).
return function(_, providers, ctx)
  local provider = providers[1]
  if not provider then
    return ctx.error_response("none", "unavailable", "no provider chosen")
  end
  if #providers > 1 then
    ctx.log("debug", "using %s; single calls one provider", provider)
  end
  return ctx.call(provider)
end
