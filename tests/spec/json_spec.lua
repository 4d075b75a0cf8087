-- aiorch.json: [] and {} kept apart, integers exact, keys in order.
local ROOT = debug.getinfo(1, "S").source:match("^@(.*)/tests/spec/[^/]+$") or "."
package.path = ROOT .. "/scripts/?.lua;" .. package.path

local json = require "aiorch.json"

describe("aiorch.json", function()
  it("keeps an empty array an array and an empty object an object, both ways", function()
    for _, text in ipairs({ '{"a":[],"b":{}}', '[[],{},[{}]]', '{"required":[ ],"x":{"y":[]}}' }) do
      local v = assert(json.decode(text))
      assert.equal(text:gsub("%s", ""), json.encode(v))
    end
    assert.equal("[]", json.encode(json.array()))
    assert.equal("{}", json.encode({}))
  end)

  it("keeps every digit of a long integer", function()
    for _, text in ipairs({ '{"seed":123456789012345678}', '[9007199254740993]', '{"n":-9007199254740993}' }) do
      assert.equal(text, json.encode(assert(json.decode(text))))
    end
    assert.equal('{"a":12345678901234,"b":0.1,"c":1.5e-07}',
      json.encode(json.decode('{"a":12345678901234,"b":0.1,"c":1.5e-7}')))
  end)

  it("writes an object's keys in order, and the same table the same way", function()
    assert.equal('{"a":1,"b":{"c":"x","d":[true,false,null]}}',
      json.encode({ b = { d = { true, false, json.null }, c = "x" }, a = 1 }))
  end)

  it("reports malformed text and values JSON cannot hold", function()
    assert.is_nil((json.decode("{")))
    assert.is_nil((json.decode("[1,")))
    assert.is_nil((json.decode(42)))
    assert.has_error(function() json.encode({ f = print }) end)
    assert.has_error(function() json.encode(0 / 0) end)
    assert.is_nil((json.encode_safe({ [true] = 1 })))
  end)

  it("writes every object right after an encode that raised half-way through one", function()
    assert.is_nil((json.encode_safe({ a = { b = { c = 0 / 0 } }, d = 1, e = 2 })))
    assert.is_nil((json.encode_safe({ a = 1, b = { [2.5] = 1 }, c = 3 })))
    assert.equal('{"x":1}', json.encode({ x = 1 }))
    assert.equal('{"p":1,"q":{"r":2,"s":3}}', json.encode({ q = { s = 3, r = 2 }, p = 1 }))
  end)

  it("quotes strings as cjson does, and repeated words once", function()
    assert.equal('"a\\/b\\"c\\n"', json.quote('a/b"c\n'))
    assert.equal('"42"', json.quote(42))
    assert.equal('""', json.quote(nil))
    assert.equal(json.word("gpt-4o"), json.word("gpt-4o"))
    assert.equal('"gpt-4o"', json.word("gpt-4o"))
  end)
end)
