-- The price table: data, read by aiorch.cost. USD per 1 million tokens.
--
-- One entry per model name, as the provider names it (a dated name such as
-- claude-3-5-haiku-20241022 finds claude-3-5-haiku here):
--   input        an input token read fresh (neither from nor into a cache)
--   output       an output token (reasoning tokens excluded, see reasoning)
--   cached_read  an input token read from the provider's prompt cache
--                (absent: as input)
--   cache_write  an input token written to the prompt cache (absent: as
--                input; a provider that charges nothing extra)
--   reasoning    a reasoning (thinking) token (absent: as output; every
--                provider here bills them as output)
--   source       the public page the figures come from
--   date         when they were read there (YYYY-MM-DD)
-- Long-context tiers (Gemini 2.5 Pro and Claude Sonnet over 200k tokens of
-- input) are not modelled: the figures are those of the shorter prompts.
-- A gateway's `prices = {...}` overrides and extends this table (docs/lua-api.md).

local OPENAI = "https://platform.openai.com/docs/pricing"
local ANTHROPIC = "https://docs.anthropic.com/en/docs/about-claude/pricing"
local GEMINI = "https://ai.google.dev/gemini-api/docs/pricing"
local COHERE = "https://cohere.com/pricing"
local GROQ = "https://groq.com/pricing"
local MISTRAL = "https://mistral.ai/pricing#api-pricing"
local DEEPSEEK = "https://api-docs.deepseek.com/quick_start/pricing"
local XAI = "https://docs.x.ai/docs/models"
local TOGETHER = "https://www.together.ai/pricing"

return {
  -- OpenAI (and Azure OpenAI, whose deployments answer with these names).
  -- Cache writes cost nothing extra.
  ["gpt-5"] = { input = 1.25, output = 10.00, cached_read = 0.125, source = OPENAI, date = "2025-10-01" },
  ["gpt-5-mini"] = { input = 0.25, output = 2.00, cached_read = 0.025, source = OPENAI, date = "2025-10-01" },
  ["gpt-5-nano"] = { input = 0.05, output = 0.40, cached_read = 0.005, source = OPENAI, date = "2025-10-01" },
  ["gpt-4.1"] = { input = 2.00, output = 8.00, cached_read = 0.50, source = OPENAI, date = "2025-10-01" },
  ["gpt-4.1-mini"] = { input = 0.40, output = 1.60, cached_read = 0.10, source = OPENAI, date = "2025-10-01" },
  ["gpt-4.1-nano"] = { input = 0.10, output = 0.40, cached_read = 0.025, source = OPENAI, date = "2025-10-01" },
  ["gpt-4o"] = { input = 2.50, output = 10.00, cached_read = 1.25, source = OPENAI, date = "2025-10-01" },
  ["gpt-4o-mini"] = { input = 0.15, output = 0.60, cached_read = 0.075, source = OPENAI, date = "2025-10-01" },
  ["o1"] = { input = 15.00, output = 60.00, cached_read = 7.50, source = OPENAI, date = "2025-10-01" },
  ["o3"] = { input = 2.00, output = 8.00, cached_read = 0.50, source = OPENAI, date = "2025-10-01" },
  ["o3-mini"] = { input = 1.10, output = 4.40, cached_read = 0.55, source = OPENAI, date = "2025-10-01" },
  ["o4-mini"] = { input = 1.10, output = 4.40, cached_read = 0.275, source = OPENAI, date = "2025-10-01" },

  -- Anthropic: cache writes of the 5-minute cache (1.25 x input), reads 0.1 x input.
  ["claude-opus-4-5"] = { input = 5.00, output = 25.00, cached_read = 0.50, cache_write = 6.25,
    source = ANTHROPIC, date = "2025-12-01" },
  ["claude-opus-4-1"] = { input = 15.00, output = 75.00, cached_read = 1.50, cache_write = 18.75,
    source = ANTHROPIC, date = "2025-10-01" },
  ["claude-opus-4"] = { input = 15.00, output = 75.00, cached_read = 1.50, cache_write = 18.75,
    source = ANTHROPIC, date = "2025-10-01" },
  ["claude-sonnet-4-5"] = { input = 3.00, output = 15.00, cached_read = 0.30, cache_write = 3.75,
    source = ANTHROPIC, date = "2025-10-01" },
  ["claude-sonnet-4"] = { input = 3.00, output = 15.00, cached_read = 0.30, cache_write = 3.75,
    source = ANTHROPIC, date = "2025-10-01" },
  ["claude-3-7-sonnet"] = { input = 3.00, output = 15.00, cached_read = 0.30, cache_write = 3.75,
    source = ANTHROPIC, date = "2025-10-01" },
  ["claude-3-5-sonnet"] = { input = 3.00, output = 15.00, cached_read = 0.30, cache_write = 3.75,
    source = ANTHROPIC, date = "2025-10-01" },
  ["claude-haiku-4-5"] = { input = 1.00, output = 5.00, cached_read = 0.10, cache_write = 1.25,
    source = ANTHROPIC, date = "2025-10-16" },
  ["claude-3-5-haiku"] = { input = 0.80, output = 4.00, cached_read = 0.08, cache_write = 1.00,
    source = ANTHROPIC, date = "2025-10-01" },
  ["claude-3-opus"] = { input = 15.00, output = 75.00, cached_read = 1.50, cache_write = 18.75,
    source = ANTHROPIC, date = "2025-10-01" },
  ["claude-3-haiku"] = { input = 0.25, output = 1.25, cached_read = 0.03, cache_write = 0.30,
    source = ANTHROPIC, date = "2025-10-01" },

  -- Google Gemini (paid tier, prompts up to 200k tokens). Thinking tokens
  -- are billed as output; context-cache storage (per hour) is not a token price.
  ["gemini-2.5-pro"] = { input = 1.25, output = 10.00, cached_read = 0.125, source = GEMINI, date = "2025-10-01" },
  ["gemini-2.5-flash"] = { input = 0.30, output = 2.50, cached_read = 0.03, source = GEMINI, date = "2025-10-01" },
  ["gemini-2.5-flash-lite"] = { input = 0.10, output = 0.40, cached_read = 0.01, source = GEMINI, date = "2025-10-01" },
  ["gemini-2.0-flash"] = { input = 0.10, output = 0.40, cached_read = 0.025, source = GEMINI, date = "2025-10-01" },
  ["gemini-2.0-flash-lite"] = { input = 0.075, output = 0.30, source = GEMINI, date = "2025-10-01" },
  ["gemini-1.5-pro"] = { input = 1.25, output = 5.00, cached_read = 0.3125, source = GEMINI, date = "2025-04-01" },
  ["gemini-1.5-flash"] = { input = 0.075, output = 0.30, cached_read = 0.01875, source = GEMINI,
    date = "2025-04-01" },

  -- Cohere: no prompt cache prices.
  ["command-a-03-2025"] = { input = 2.50, output = 10.00, source = COHERE, date = "2025-10-01" },
  ["command-r-plus-08-2024"] = { input = 2.50, output = 10.00, source = COHERE, date = "2025-10-01" },
  ["command-r-plus"] = { input = 2.50, output = 10.00, source = COHERE, date = "2025-10-01" },
  ["command-r-08-2024"] = { input = 0.15, output = 0.60, source = COHERE, date = "2025-10-01" },
  ["command-r"] = { input = 0.15, output = 0.60, source = COHERE, date = "2025-10-01" },
  ["command-r7b-12-2024"] = { input = 0.0375, output = 0.15, source = COHERE, date = "2025-10-01" },

  -- OpenAI-compatible presets (scripts/aiorch/compat.lua). Local servers
  -- (Ollama, vLLM, LM Studio) have no price: give one in the configuration.
  ["llama-3.3-70b-versatile"] = { input = 0.59, output = 0.79, source = GROQ, date = "2025-10-01" },
  ["llama-3.1-8b-instant"] = { input = 0.05, output = 0.08, source = GROQ, date = "2025-10-01" },
  ["mistral-large-latest"] = { input = 2.00, output = 6.00, source = MISTRAL, date = "2025-10-01" },
  ["mistral-medium-latest"] = { input = 0.40, output = 2.00, source = MISTRAL, date = "2025-10-01" },
  ["mistral-small-latest"] = { input = 0.10, output = 0.30, source = MISTRAL, date = "2025-10-01" },
  ["codestral-latest"] = { input = 0.30, output = 0.90, source = MISTRAL, date = "2025-10-01" },
  -- DeepSeek: cache hits are cached_read; a miss is input.
  ["deepseek-chat"] = { input = 0.28, output = 0.42, cached_read = 0.028, source = DEEPSEEK, date = "2025-10-01" },
  ["deepseek-reasoner"] = { input = 0.28, output = 0.42, cached_read = 0.028, source = DEEPSEEK,
    date = "2025-10-01" },
  ["grok-4"] = { input = 3.00, output = 15.00, cached_read = 0.75, source = XAI, date = "2025-10-01" },
  ["grok-3"] = { input = 3.00, output = 15.00, cached_read = 0.75, source = XAI, date = "2025-10-01" },
  ["grok-3-mini"] = { input = 0.30, output = 0.50, cached_read = 0.075, source = XAI, date = "2025-10-01" },
  ["meta-llama/Llama-3.3-70B-Instruct-Turbo"] = { input = 0.88, output = 0.88, source = TOGETHER,
    date = "2025-10-01" },
  ["openai/gpt-4o-mini"] = { input = 0.15, output = 0.60, cached_read = 0.075, source = OPENAI,
    date = "2025-10-01" },
}
