-- luacheck configuration for aiorch's Lua layer.
std = "lua54"
max_line_length = 120
codes = true

exclude_files = { "build/**", ".git/**" }

files["tests/spec/**/*_spec.lua"] = { std = "+busted" }
files["tests/**/*.lua"] = { std = "+busted" }

-- The busted launcher hands busted its argument list through the global arg.
files["tests/busted.lua"] = { globals = { "arg" } }
