-- aiorch.server over real loopback sockets: aiorch.http for ordinary
-- requests, a raw TCP client (python3, run in the background and polled) for
-- pipelining, malformed input and slow readers.
local aiorch = require "aiorch"
local support = require "tests.support"

local HOST = "127.0.0.1"

local wait_for, slurp = support.wait_for, support.read

local function listen(handler, opts)
  opts = opts or {}
  opts.host = opts.host or HOST
  opts.port = opts.port or 0
  opts.handler = handler
  return assert(aiorch.server.listen(opts))
end

local function url(srv, path)
  return string.format("http://%s:%d%s", HOST, srv.port, path or "/")
end

local function get(srv, path, opts)
  opts = opts or {}
  opts.url = url(srv, path)
  return aiorch.http.request(opts)
end

-- The raw client: sends a file's bytes, waits `pause` seconds, then reads
-- until the server closes (or 10 s pass) and writes what it got to `out`
-- (renamed into place, so the file's presence means done).
local RAW_CLIENT = [[
import socket, sys, time, os
port, infile, out, pause = int(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
s = socket.create_connection(("127.0.0.1", port))
s.settimeout(10)
for i, part in enumerate(open(infile, "rb").read().split(b"<pause>")):
    if i:
        time.sleep(0.03)
    s.sendall(part)
time.sleep(pause)
got = []
try:
    while True:
        b = s.recv(65536)
        if not b:
            break
        got.append(b)
except Exception as e:
    got.append(("\n<client error: %s>" % e).encode())
s.close()
with open(out + ".tmp", "wb") as f:
    f.write(b"".join(got))
os.rename(out + ".tmp", out)
]]

local script = os.tmpname()
support.write(script, RAW_CLIENT)

-- Sends payload to srv from a background process; returns a function that
-- waits for (and returns) everything the server sent until it closed.
local function raw(srv, payload, pause)
  local input, out = os.tmpname(), os.tmpname()
  os.remove(out)
  support.write(input, payload)
  assert(os.execute(string.format("python3 %s %d %s %s %s >/dev/null 2>&1 &",
    script, srv.port, input, out, tostring(pause or 0))))
  return function(ms)
    local got = wait_for(function() return slurp(out) end, ms or 8000)
    os.remove(input)
    os.remove(out)
    return got
  end
end

-- Splits raw HTTP/1.1 responses: returns a list of {status, headers, body}.
local function parse_responses(s)
  local list = {}
  local pos = 1
  while pos <= #s do
    local head_end = s:find("\r\n\r\n", pos, true)
    if not head_end then
      break
    end
    local head = s:sub(pos, head_end - 1)
    local status = tonumber(head:match("^HTTP/1%.%d (%d%d%d)"))
    local headers = {}
    for k, v in head:gmatch("\r\n([^:\r\n]+):%s*([^\r\n]*)") do
      headers[k:lower()] = v
    end
    local body
    pos = head_end + 4
    if headers["content-length"] then
      local n = tonumber(headers["content-length"])
      body = s:sub(pos, pos + n - 1)
      pos = pos + n
    elseif headers["transfer-encoding"] == "chunked" then
      local parts = {}
      while true do
        local line_end = assert(s:find("\r\n", pos, true), "truncated chunk")
        local n = tonumber(s:sub(pos, line_end - 1), 16)
        pos = line_end + 2
        if n == 0 then
          pos = pos + 2
          break
        end
        parts[#parts + 1] = s:sub(pos, pos + n - 1)
        pos = pos + n + 2
      end
      body = table.concat(parts)
    else
      body = s:sub(pos)
      pos = #s + 1
    end
    list[#list + 1] = { status = status, headers = headers, body = body }
  end
  return list
end

describe("aiorch.server", function()
  local srv

  after_each(function()
    if srv then
      pcall(srv.close, srv)
      srv = nil
    end
  end)

  teardown(function()
    os.remove(script)
  end)

  it("answers a plain request and describes it in req", function()
    local seen
    srv = listen(function(req, res)
      seen = req
      res:respond(201, { ["content-type"] = "text/plain", ["x-answer"] = 42 }, "got " .. req.body)
    end)
    assert.is_number(srv.port)
    assert.is_true(srv.port > 0)
    assert.equal(HOST, srv.host)
    local before = aiorch.now()
    local status, headers, body = aiorch.http.request {
      url = url(srv, "/v1/x?a=1&b=2"),
      method = "PUT",
      headers = { ["X-Mixed-Case"] = "yes", ["content-type"] = "application/json" },
      body = '{"q":1}',
    }
    assert.equal(201, status)
    assert.equal("got {\"q\":1}", body)
    assert.equal("42", headers["x-answer"])
    assert.equal("text/plain", headers["content-type"])
    assert.equal(tostring(#body), headers["content-length"])
    assert.equal("PUT", seen.method)
    assert.equal("/v1/x?a=1&b=2", seen.path)
    assert.equal("yes", seen.headers["x-mixed-case"])
    assert.is_nil(seen.headers["X-Mixed-Case"])
    assert.equal("application/json", seen.headers["content-type"])
    assert.equal('{"q":1}', seen.body)
    assert.equal(1, seen.id)
    assert.is_true(seen.received_at >= before and seen.received_at <= aiorch.now())
    assert.is_nil(seen.aborted_at)
  end)

  it("uses content-length when given and chunks otherwise", function()
    srv = listen(function(req, res)
      if req.path == "/length" then
        res:start(200, { ["content-length"] = "10" })
        res:write("01234")
        res:write("56789")
        res:finish()
      else
        res:start(200, { ["content-type"] = "text/plain" })
        for i = 1, 5 do
          assert(res:write("part" .. i .. ";"))
          aiorch.sleep(1)
        end
        res:write("")
        res:finish("end")
      end
    end)
    local status, headers, body = get(srv, "/length")
    assert.equal(200, status)
    assert.equal("10", headers["content-length"])
    assert.is_nil(headers["transfer-encoding"])
    assert.equal("0123456789", body)
    status, headers, body = get(srv, "/chunked")
    assert.equal(200, status)
    assert.equal("chunked", headers["transfer-encoding"])
    assert.is_nil(headers["content-length"])
    assert.equal("part1;part2;part3;part4;part5;end", body)
  end)

  it("finishes a response the handler left open", function()
    srv = listen(function(req, res)
      if req.path == "/nothing" then
        return
      end
      res:start(202)
      res:write("partial")
    end)
    local status, headers, body = get(srv, "/nothing")
    assert.equal(200, status)
    assert.equal("0", headers["content-length"])
    assert.equal("", body)
    status, headers, body = get(srv, "/started")
    assert.equal(202, status)
    assert.equal("chunked", headers["transfer-encoding"])
    assert.equal("partial", body)
  end)

  it("keeps connections alive between requests", function()
    srv = listen(function(req, res)
      res:respond(200, nil, req.path)
    end)
    for i = 1, 5 do
      local status, _, body = get(srv, "/r" .. i)
      assert.equal(200, status)
      assert.equal("/r" .. i, body)
    end
    local st = srv:stats()
    assert.equal(1, st.accepted)
    assert.equal(5, st.requests)
    assert.equal(0, st.aborted)
    assert.equal(1, st.open)
  end)

  it("answers pipelined requests in order, one at a time", function()
    local running, most = 0, 0
    srv = listen(function(req, res)
      running = running + 1
      most = math.max(most, running)
      if req.path == "/slow" then
        aiorch.sleep(50)
      end
      running = running - 1
      res:respond(200, { ["content-type"] = "text/plain" }, req.path .. ":" .. req.body)
    end)
    local done = raw(srv, "GET /slow HTTP/1.1\r\nHost: x\r\n\r\n"
      .. "POST /post HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
      .. "POST /chunked HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
      .. "2\r\nde\r\n3\r\nfgh\r\n0\r\n\r\n"
      .. "GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    local got = assert(done())
    local list = parse_responses(got)
    assert.equal(4, #list)
    assert.equal("/slow:", list[1].body)
    assert.equal("/post:abc", list[2].body)
    assert.equal("/chunked:defgh", list[3].body)
    assert.equal("/last:", list[4].body)
    assert.equal("close", list[4].headers.connection)
    assert.equal(1, most)
    assert.equal(4, srv:stats().requests)
    assert.equal(1, srv:stats().accepted)
    assert.is_true(wait_for(function() return srv:stats().open == 0 end))
  end)

  it("parses requests that arrive in pieces, with the next one behind", function()
    srv = listen(function(req, res)
      res:respond(200, { ["content-type"] = "text/plain" }, req.path .. ":" .. req.headers["x-long"] .. ":" .. req.body)
    end)
    local done = raw(srv, "POST /a HTTP/1.1\r\nHost: x\r\nX-Lo<pause>ng: 12<pause>34\r\n"
      .. "Content-Length: 5\r\n\r\nab<pause>cd"
      .. "eGET /b HTTP/1.1\r\nX-Long: z\r\n<pause>Connection: close\r\n\r\n")
    local list = parse_responses(assert(done()))
    assert.equal(2, #list)
    assert.equal("/a:1234:abcde", list[1].body)
    assert.equal("/b:z:", list[2].body)
  end)

  it("joins repeated request headers and honours HTTP/1.0", function()
    local seen
    srv = listen(function(req, res)
      seen = req
      res:start(200)
      res:write("old ")
      res:finish("client")
    end)
    local got = assert(raw(srv, "GET /h HTTP/1.0\r\nX-Dup: a\r\nx-dup: b\r\nX-Empty:\r\n\r\n")())
    local list = parse_responses(got)
    assert.equal(1, #list)
    assert.equal(200, list[1].status)
    assert.is_nil(list[1].headers["transfer-encoding"])
    assert.equal("old client", list[1].body)
    assert.equal("close", list[1].headers.connection)
    assert.equal("a, b", seen.headers["x-dup"])
    assert.equal("", seen.headers["x-empty"])
  end)

  it("sends no body for HEAD", function()
    srv = listen(function(_, res)
      res:respond(200, { ["content-type"] = "text/plain" }, "twelve bytes")
    end)
    local got = assert(raw(srv, "HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")())
    assert.matches("^HTTP/1%.1 200 OK\r\n", got)
    assert.matches("content%-length: 12\r\n", got)
    assert.equal(got:find("\r\n\r\n", 1, true) + 3, #got)
  end)

  it("answers 413 to a body over max_body", function()
    local calls = 0
    srv = listen(function(_, res)
      calls = calls + 1
      res:respond(200, nil, "ok")
    end, { max_body = 1000 })
    local status = aiorch.http.request { url = url(srv, "/up"), body = string.rep("x", 1000) }
    assert.equal(200, status)
    status = aiorch.http.request { url = url(srv, "/up"), body = string.rep("x", 5000) }
    assert.equal(413, status)
    status = aiorch.http.request { url = url(srv, "/up"), body = string.rep("x", 300 * 1024) }
    assert.equal(413, status)
    -- a chunked body is counted as it arrives
    local got = assert(raw(srv, "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
      .. "400\r\n" .. string.rep("y", 1024) .. "\r\n0\r\n\r\n")())
    assert.matches("^HTTP/1%.1 413 ", got)
    assert.matches("connection: close", got)
    assert.equal(1, calls)
  end)

  it("answers 400 to garbage and closes", function()
    local calls = 0
    srv = listen(function(_, res)
      calls = calls + 1
      res:respond(200, nil, "ok")
    end)
    local got = assert(raw(srv, "THIS IS NOT HTTP\r\n\r\n")())
    assert.matches("^HTTP/1%.1 400 Bad Request\r\n", got)
    got = assert(raw(srv, "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n")())
    assert.matches("^HTTP/1%.1 400 ", got)
    -- a good request before garbage is still answered
    got = assert(raw(srv, "GET /ok HTTP/1.1\r\nHost: x\r\n\r\n\1\2\3 nonsense\r\n\r\n")())
    local list = parse_responses(got)
    assert.equal(200, list[1].status)
    assert.equal(400, list[2].status)
    assert.equal(1, calls)
    assert.is_true(wait_for(function() return srv:stats().open == 0 end))
  end)

  -- Shapes that let a front proxy and this server frame a request
  -- differently (RFC 9112 5.1, 5.2, 6.1): each is answered 400 and never
  -- reaches the handler.
  local SMUGGLING = {
    { "content-length with transfer-encoding",
      "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n" },
    { "two content-lengths", "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd" },
    { "chunked not last", "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n" },
    { "space before the colon", "GET / HTTP/1.1\r\nHost: x\r\nFoo : bar\r\n\r\n" },
    { "content-length with a space before the colon",
      "POST / HTTP/1.1\r\nHost: x\r\nContent-Length : 3\r\n\r\nabc" },
    { "transfer-encoding with a space before the colon",
      "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n" },
    { "tab before the colon", "GET / HTTP/1.1\r\nHost: x\r\nFoo\t: bar\r\n\r\n" },
    { "space inside a name", "GET / HTTP/1.1\r\nHost: x\r\nFo o: bar\r\n\r\n" },
    { "empty name", "GET / HTTP/1.1\r\nHost: x\r\n: bar\r\n\r\n" },
    { "whitespace before the first header", "GET / HTTP/1.1\r\n Host: x\r\n\r\n" },
    { "obsolete line folding", "GET / HTTP/1.1\r\nHost: x\r\nFoo: bar\r\n baz\r\n\r\n" },
    { "obsolete line folding with a tab", "GET / HTTP/1.1\r\nHost: x\r\nFoo: bar\r\n\tbaz\r\n\r\n" },
    { "folded content-length", "POST / HTTP/1.1\r\nHost: x\r\nContent-Length:\r\n 3\r\n\r\nabc" },
    { "a fold split across reads", "GET / HTTP/1.1\r\nHost: x\r\nFoo: bar\r\n<pause> baz\r\n\r\n" },
    { "a name split across reads", "GET / HTTP/1.1\r\nHost: x\r\nFo<pause>o : bar\r\n\r\n" },
    { "a NUL in a value", "GET / HTTP/1.1\r\nHost: x\r\nFoo: b\0r\r\n\r\n" },
  }

  it("refuses request-smuggling shapes with 400", function()
    local seen = {}
    srv = listen(function(req, res)
      seen[#seen + 1] = req.path .. " " .. tostring(req.headers.foo)
      res:respond(200, nil, "ok")
    end)
    local waits = {}
    for i, case in ipairs(SMUGGLING) do
      waits[i] = raw(srv, case[2])
    end
    for i, case in ipairs(SMUGGLING) do
      local got = assert(waits[i](), case[1])
      local list = parse_responses(got)
      assert.equal(1, #list, case[1] .. ": " .. got)
      assert.equal(400, list[1].status, case[1])
      assert.equal("close", list[1].headers.connection, case[1])
    end
    assert.same({}, seen)
    -- their well-formed neighbours pass
    local got = assert(raw(srv, "GET /a HTTP/1.1\r\nHost: x\r\nFoo:bar\r\n\r\n"
      .. "GET /b HTTP/1.1\r\nHost: x\r\nFoo: \tbar baz \r\nX-Empty:\r\nX-Next: 1\r\n\r\n"
      .. "GET /c HTTP/1.1\nHost: x\nConnection: close\n\n")())
    local list = parse_responses(got)
    assert.equal(3, #list)
    assert.same({ "/a bar", "/b bar baz ", "/c nil" }, seen)
  end)

  it("calls on_headers before reading the body, with the req the handler gets", function()
    local hooked, handled = {}, {}
    srv = listen(function(req, res)
      handled[#handled + 1] = req
      res:respond(200, nil, req.path .. ":" .. #req.body)
    end, {
      max_body = 8 * 1024 * 1024,
      on_headers = function(req)
        hooked[#hooked + 1] = req
        assert(req.body == nil, "no body yet")
        local p = req.path
        if p == "/deny" then
          return 401, '{"error":"no key"}', "application/json", { ["www-authenticate"] = "Bearer", ["x-n"] = 7 }
        elseif p == "/plain" then
          return 403
        elseif p == "/raise" then
          error("a broken hook")
        elseif p == "/bad-status" then
          return 99, "x"
        elseif p == "/bad-header" then
          return 401, "x", nil, { ["content-length"] = "5" }
        elseif p == "/yield" then
          aiorch.sleep(1)
        elseif p == "/close" then
          srv:close()
        end
        req.seen_by_hook = true
      end,
    })
    -- a refused request's body is never read: 4 MiB go to a closed door
    local big = string.rep("b", 4 * 1024 * 1024)
    local got = assert(raw(srv, "POST /deny HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: "
      .. #big .. "\r\n\r\n<pause>" .. big)())
    local list = parse_responses(got)
    assert.equal(1, #list, got:sub(1, 300))
    assert.equal(401, list[1].status)
    assert.equal('{"error":"no key"}', list[1].body)
    assert.equal("application/json", list[1].headers["content-type"])
    assert.equal("Bearer", list[1].headers["www-authenticate"])
    assert.equal("7", list[1].headers["x-n"])
    assert.equal("close", list[1].headers.connection)
    assert.falsy(got:find("100 Continue", 1, true)) -- refused before the client sent its body
    assert.equal(0, srv:stats().buffered)
    list = parse_responses(assert(raw(srv, "GET /plain HTTP/1.1\r\nHost: x\r\n\r\n")()))
    assert.equal(403, list[1].status)
    assert.equal("", list[1].body)
    assert.equal("text/plain", list[1].headers["content-type"])
    -- raising, yielding, closing the server, nonsense: reported, answered 500
    for _, path in ipairs { "/raise", "/bad-status", "/bad-header", "/yield", "/close" } do
      list = parse_responses(assert(raw(srv, "GET " .. path .. " HTTP/1.1\r\nHost: x\r\n\r\n")()))
      assert.equal(500, list[1].status, path)
    end
    assert.equal(0, #handled)
    -- going on: the same table, now with the body
    local status, _, body = aiorch.http.request { url = url(srv, "/ok"), body = "12345" }
    assert.equal(200, status)
    assert.equal("/ok:5", body)
    assert.equal(1, #handled)
    assert.equal(hooked[#hooked], handled[1])
    assert.is_true(handled[1].seen_by_hook)
    assert.equal("12345", handled[1].body)
    assert.is_number(handled[1].id)
    assert.is_number(handled[1].received_at)
    assert.equal(8, #hooked)
    assert.has_error(function() aiorch.server.listen { handler = function() end, on_headers = 1 } end)
  end)

  it("grows a body as it arrives and counts the bytes it holds", function()
    local sizes = {}
    srv = listen(function(req, res)
      sizes[#sizes + 1] = #req.body
      res:respond(200, nil, "ok")
    end, { max_body = 4 * 1024 * 1024 })
    -- 4 MiB declared, 64 KiB sent, then a pause: nothing like 4 MiB is held
    local part = string.rep("p", 64 * 1024)
    local done = raw(srv, "POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: "
      .. 4 * 1024 * 1024 .. "\r\n\r\n" .. part .. "<pause>" .. string.rep("<pause>", 20)
      .. string.rep("q", 4 * 1024 * 1024 - #part))
    assert.is_true(wait_for(function() return srv:stats().buffered >= #part end))
    local held = srv:stats().buffered
    assert.is_true(held <= 256 * 1024, "held " .. held)
    local list = parse_responses(assert(done()))
    assert.equal(200, list[1].status)
    assert.same({ 4 * 1024 * 1024 }, sizes)
    assert.is_true(wait_for(function() return srv:stats().buffered == 0 end))
  end)

  it("answers 503 to a body that would pass max_buffered, and releases every byte", function()
    local got_bodies = 0
    srv = listen(function(req, res)
      got_bodies = got_bodies + 1
      aiorch.sleep(50)
      res:respond(200, nil, tostring(#req.body))
    end, { max_body = 1024 * 1024, max_buffered = 1024 * 1024 })
    -- declared beyond the cap: refused before the body is read
    local list = parse_responses(assert(raw(srv, "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: "
      .. 1024 * 1024 + 1 .. "\r\n\r\n")()))
    assert.equal(413, list[1].status) -- max_body comes first
    -- six slow 300 KiB bodies at once: the 1 MiB cap lets some finish
    local body = string.rep("s", 300 * 1024)
    local waits = {}
    for i = 1, 6 do
      local slices = {}
      for k = 1, #body, 20 * 1024 do
        slices[#slices + 1] = body:sub(k, k + 20 * 1024 - 1)
      end
      waits[i] = raw(srv, "POST /" .. i .. " HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: "
        .. #body .. "\r\n\r\n" .. table.concat(slices, "<pause>"))
    end
    local counts = {}
    for i = 1, 6 do
      local l = parse_responses(assert(waits[i](15000)))
      local st = l[1] and l[1].status
      counts[st] = (counts[st] or 0) + 1
    end
    assert.is_true((counts[503] or 0) >= 1, "none refused")
    assert.is_true((counts[200] or 0) >= 1, "none served")
    assert.equal(6, (counts[503] or 0) + (counts[200] or 0))
    assert.equal(counts[200], got_bodies)
    assert.is_true(wait_for(function() return srv:stats().buffered == 0 end))
    assert.has_error(function() aiorch.server.listen { handler = function() end, max_buffered = -1 } end)
  end)

  it("closes a connection whose client does not read, and cancels its handler", function()
    local result, task
    srv = listen(function(_, res)
      task = aiorch.current()
      res:start(200, { ["content-type"] = "application/octet-stream" })
      local chunk = string.rep("w", 64 * 1024)
      for _ = 1, 2000 do -- 125 MiB: far more than the socket buffers hold
        local ok, err = res:write(chunk)
        if not ok then
          result = err
          return
        end
      end
      result = "all written"
    end, { send_timeout_ms = 300 })
    -- the client sends its request, then reads nothing for 3 s
    local t0 = aiorch.now()
    local done = raw(srv, "GET / HTTP/1.1\r\nHost: x\r\n\r\n", 3)
    assert.is_true(wait_for(function() return srv:stats().aborted == 1 end, 3000))
    local took = aiorch.now() - t0
    assert.is_true(took > 250 and took < 2500, "closed after " .. took .. " ms")
    assert.equal("cancelled", task:status())
    assert.is_nil(result)
    assert.equal(1, srv:stats().timed_out)
    assert.equal(0, srv:stats().open)
    done()
  end)

  it("has a documented default for every limit", function()
    srv = listen(function() end)
    assert.same({
      max_connections = 10000, max_header = 32 * 1024, max_body = 1024 * 1024, max_buffered = 256 * 1024 * 1024,
      header_timeout_ms = 10000, body_timeout_ms = 60000, read_timeout_ms = 30000, idle_timeout_ms = 75000,
      send_timeout_ms = 60000,
    }, srv:limits())
    local other = listen(function() end, { max_connections = 0, header_timeout_ms = 0, send_timeout_ms = 1500 })
    local l = other:limits()
    other:close()
    assert.equal(0, l.max_connections)
    assert.equal(0, l.header_timeout_ms)
    assert.equal(1500, l.send_timeout_ms)
  end)

  it("answers 500 when the handler raises before responding", function()
    local reports = 0
    srv = listen(function(req, res)
      reports = reports + 1
      if req.path == "/late" then
        res:start(200)
        res:write("some")
        error("late failure")
      elseif req.path == "/shaped" then
        res:on_error('{"error":"shaped"}')
      end
      error("early failure")
    end)
    local status, _, body = get(srv, "/early")
    assert.equal(500, status)
    assert.equal("internal server error\n", body)
    -- res:on_error sets what a failure answers
    local h
    status, h, body = get(srv, "/shaped")
    assert.equal(500, status)
    assert.equal('{"error":"shaped"}', body)
    assert.equal("application/json", h["content-type"])
    -- the server goes on serving, on the same connection
    status = get(srv, "/early")
    assert.equal(500, status)
    assert.equal(1, srv:stats().accepted)
    -- after the start the response can only be cut
    local s2, kind = get(srv, "/late")
    assert.is_nil(s2)
    assert.is_string(kind)
    assert.equal(4, reports)
  end)

  it("cuts the response on res:abort() and write then says closed", function()
    local w1, w2, e2
    srv = listen(function(_, res)
      res:start(200, { ["content-length"] = "100" })
      w1 = res:write("only part")
      aiorch.sleep(10)
      res:abort()
      w2, e2 = res:write("more")
      res:abort() -- twice is harmless
    end)
    local status, kind = get(srv, "/")
    assert.is_nil(status)
    assert.is_string(kind)
    assert.is_true(wait_for(function() return w2 ~= nil or e2 ~= nil end))
    assert.is_true(w1)
    assert.is_nil(w2)
    assert.equal("closed", e2)
    assert.equal(0, srv:stats().aborted)
    assert.equal(0, srv:stats().open)
  end)

  it("cancels the handler and sets req.aborted_at when the client goes away", function()
    local seen, task, after_sleep = nil, nil, false
    srv = listen(function(req, res)
      seen, task = req, aiorch.current()
      res:start(200)
      res:write("waiting")
      aiorch.sleep(5000)
      after_sleep = true
    end)
    local status, kind = get(srv, "/", { timeout_ms = 200 })
    assert.is_nil(status)
    assert.equal("timeout", kind)
    assert.is_truthy(wait_for(function() return seen and seen.aborted_at end))
    assert.is_true(seen.aborted_at >= seen.received_at)
    assert.equal("cancelled", task:status())
    assert.is_false(after_sleep)
    local st = srv:stats()
    assert.equal(1, st.aborted)
    assert.equal(0, st.open)
  end)

  it("closes the connection when the handler task is cancelled", function()
    srv = listen(function(req, res)
      if req.path == "/self" then
        aiorch.current():cancel()
        aiorch.sleep(10)
      end
      res:respond(200, nil, "never")
    end)
    local status = get(srv, "/self")
    assert.is_nil(status)
    assert.is_true(wait_for(function() return srv:stats().open == 0 end))
    assert.equal(0, srv:stats().aborted)
  end)

  it("streams 10 MiB through backpressure", function()
    local results = {}
    local chunk = string.rep("0123456789abcdef", 4096) -- 64 KiB
    srv = listen(function(req, res)
      res:start(200, { ["content-type"] = "application/octet-stream" })
      if req.path == "/one" then
        results[#results + 1] = res:write(string.rep(chunk, 160))
      else
        for _ = 1, 160 do
          local ok, err = res:write(chunk)
          if not ok then
            results[#results + 1] = err
            return
          end
        end
        results[#results + 1] = true
      end
      res:finish()
    end)
    for _, path in ipairs { "/many", "/one" } do
      local status, _, body = get(srv, path, { max_body = 16 * 1024 * 1024 })
      assert.equal(200, status)
      assert.equal(10 * 1024 * 1024, #body)
      assert.equal(chunk, body:sub(1, #chunk))
      assert.equal(chunk, body:sub(-#chunk))
    end
    assert.same({ true, true }, results)
  end)

  it("yields writers while a slow client reads", function()
    local chunk = string.rep("z", 64 * 1024)
    local longest, total = 0, 0
    srv = listen(function(_, res)
      res:start(200, { ["content-length"] = tostring(512 * #chunk) })
      for _ = 1, 512 do
        local t0 = aiorch.now()
        assert(res:write(chunk))
        longest = math.max(longest, aiorch.now() - t0)
        total = total + #chunk
      end
      res:finish()
    end)
    -- the client waits 0.5 s before reading anything
    local got = assert(raw(srv, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 0.5)(15000))
    local list = parse_responses(got)
    assert.equal(1, #list)
    assert.equal(32 * 1024 * 1024, #list[1].body)
    assert.equal(32 * 1024 * 1024, total)
    assert.is_true(longest > 200, "no write waited: " .. longest)
  end)

  it("answers Expect: 100-continue without a stall", function()
    local seen
    srv = listen(function(req, res)
      seen = req
      res:respond(200, nil, tostring(#req.body))
    end, { max_body = 4 * 1024 * 1024 })
    local t0 = aiorch.now()
    local status, _, body = aiorch.http.request {
      url = url(srv, "/big"),
      headers = { expect = "100-continue" },
      body = string.rep("b", 200 * 1024),
    }
    assert.equal(200, status)
    assert.equal(tostring(200 * 1024), body)
    assert.equal("100-continue", seen.headers.expect)
    assert.is_true(aiorch.now() - t0 < 800)
  end)

  it("raises on misuse", function()
    local handler = function() end
    assert.has_error(function() aiorch.server.listen() end)
    assert.has_error(function() aiorch.server.listen { port = 0 } end)
    assert.has_error(function() aiorch.server.listen { handler = handler, port = "80" } end)
    assert.has_error(function() aiorch.server.listen { handler = handler, port = 70000 } end)
    assert.has_error(function() aiorch.server.listen { handler = handler, max_body = -1 } end)
    assert.has_error(function() aiorch.server.listen { handler = handler, host = 1 } end)
    assert.has_error(function() aiorch.server.listen { handler = handler, bogus = true } end)

    local errs = {}
    srv = listen(function(req, res)
      local function try(name, f, ...)
        local ok, err = pcall(f, ...)
        errs[name] = not ok and tostring(err) or false
      end
      if req.path == "/a" then
        try("status", res.start, res, 99)
        try("header_crlf", res.start, res, 200, { ["x-bad"] = "a\r\nx-injected: 1" })
        try("header_name", res.start, res, 200, { ["bad name"] = "v" })
        try("header_type", res.start, res, 200, { ["x-v"] = true })
        assert(res:start(200, { ["content-length"] = "4" }))
        try("start_twice", res.start, res, 200)
        try("respond_after_start", res.respond, res, 200, nil, "x")
        try("too_long", res.write, res, "12345")
        try("too_short", res.finish, res, "1")
        try("write_type", res.write, res, {})
        res:finish("1234")
        try("write_after_finish", res.write, res, "x")
        try("finish_twice", res.finish, res)
        try("start_after_finish", res.start, res, 200)
      else
        res:respond(204)
        try("respond_twice", res.respond, res, 200, nil, "")
      end
    end)
    local status, _, body = get(srv, "/a")
    assert.equal(200, status)
    assert.equal("1234", body)
    status, _, body = get(srv, "/b")
    assert.equal(204, status)
    assert.equal("", body)
    for _, name in ipairs { "status", "header_crlf", "header_name", "header_type", "start_twice",
      "respond_after_start", "too_long", "too_short", "write_type", "write_after_finish",
      "finish_twice", "start_after_finish", "respond_twice" } do
      assert.is_string(errs[name], name .. " should have raised")
    end
    assert.matches("already finished", errs.write_after_finish)

    local closed = listen(handler)
    closed:close()
    assert.has_error(function() closed:close() end, "attempt to use a closed server")
    assert.has_error(function() closed:stats() end, "attempt to use a closed server")
    assert.matches("closed", tostring(closed))
  end)

  it("reports an address in use as an expected failure", function()
    srv = listen(function() end)
    local other, kind, msg = aiorch.server.listen { host = HOST, port = srv.port, handler = function() end }
    assert.is_nil(other)
    assert.equal("listen", kind)
    assert.is_string(msg)
  end)

  it("closes every connection and cancels handlers on close()", function()
    local started, tasks = 0, {}
    srv = listen(function(_, res)
      started = started + 1
      tasks[#tasks + 1] = aiorch.current()
      res:start(200)
      aiorch.sleep(10000)
    end)
    local port = srv.port
    local clients = {}
    for i = 1, 3 do
      clients[i] = aiorch.spawn(get, srv, "/", { timeout_ms = 5000 })
    end
    assert.is_true(wait_for(function() return started == 3 end))
    assert.equal(3, srv:stats().open)
    local t0 = aiorch.now()
    srv:close()
    srv = nil
    for i = 1, 3 do
      local status, kind = clients[i]:await()
      assert.is_nil(status)
      assert.is_string(kind)
      assert.equal("cancelled", tasks[i]:status())
    end
    assert.is_true(aiorch.now() - t0 < 2000)
    local status, kind = aiorch.http.request { url = string.format("http://%s:%d/", HOST, port) }
    assert.is_nil(status)
    assert.equal("connect", kind)
  end)

  it("closes through a to-be-closed variable", function()
    local port
    do
      local s <close> = listen(function(_, res) res:respond(200, nil, "x") end)
      port = s.port
      assert.equal(200, (aiorch.http.request { url = string.format("http://%s:%d/", HOST, port) }))
    end
    local status, kind = aiorch.http.request { url = string.format("http://%s:%d/", HOST, port) }
    assert.is_nil(status)
    assert.equal("connect", kind)
  end)

  it("gives each request of a server its own id", function()
    local ids = {}
    srv = listen(function(req, res)
      ids[#ids + 1] = req.id
      res:respond(200, nil, "")
    end)
    local tasks = {}
    for i = 1, 20 do
      tasks[i] = aiorch.spawn(get, srv, "/" .. i)
    end
    local values = aiorch.gather(tasks)
    for i = 1, 20 do
      assert.equal(200, values[i])
    end
    table.sort(ids)
    for i = 1, 20 do
      assert.equal(i, ids[i])
    end
    assert.equal(20, srv:stats().requests)
  end)
end)
