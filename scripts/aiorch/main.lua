-- Entry point of the `aiorch` command: runs as the runtime's main task.
local cli = require "aiorch.cli"

return cli.main({ ... })
