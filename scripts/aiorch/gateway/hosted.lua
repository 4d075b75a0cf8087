-- The gateway as a handler for a host's server: what nginx's aiorch_gateway
-- loads (aiorch_handler_load) in each worker, with the aiorch_config file
-- (or "": the configuration from the environment, as `aiorch serve` without
-- --config). The same routes, limits and answers as `aiorch serve`; the
-- host reads the requests and writes the responses.
local gateway = require "aiorch.gateway.server"

local config_file = ...

local h, err = gateway.handler { config_file = config_file ~= "" and config_file or nil }
if not h then
  error(err, 0)
end
return h
