# Hostile HTTP clients for tests/spec/hostile_spec.lua, tests/spec/serve_spec.lua,
# bench/hostile.lua and bench/hostile_streams.lua, against 127.0.0.1:PORT. Each mode prints its results on stdout:
#
#   hold PORT N SECS
#       A keep-alive client asks GET /healthz; then N connections open and
#       stay SECS seconds, sending nothing; the first client asks again
#       halfway; once they are closed, fresh connections ask until one is
#       answered. Prints "first STATUS", "during STATUS", "after STATUS SECS".
#   bodies PORT N SIZE SLICE EVERY HEADERS
#       N connections each POST /v1/chat/completions with a SIZE-byte body,
#       sent SLICE bytes at a time to each connection in turn, sleeping
#       EVERY seconds after each round (every body is in flight at once).
#       HEADERS: more header lines, with \r\n escapes. Prints each one's
#       status (0: none).
#   trickle PORT N EVERY SECS HEAD BYTES
#       N connections each send HEAD (with \r\n escapes), then one byte of
#       BYTES (cycling) every EVERY seconds, until the server closes them or
#       SECS pass. Prints, per connection, the seconds from its first byte to
#       the close (-1: still open) and the status it got (0: none).
#   streams PORT N CONTENT
#       N connections each POST /v1/chat/completions (X-Aiorch-Providers:
#       openai) for a stream of gpt-4o-mini's answer to CONTENT, and never
#       read it. Prints "SENT" once every request is sent, then sleeps an hour.
# STATUS 0 means no HTTP/1.1 answer.
import select
import socket
import sys
import time


def status_of(b):
    return b[9:12].decode() if b.startswith(b"HTTP/1.1 ") else "0"


def unescape(s):
    return s.encode().decode("unicode_escape").encode("latin-1")


def ask(s, path="/healthz"):
    s.sendall(("GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path).encode())
    got = b""
    while b"\r\n\r\n" not in got:
        b = s.recv(65536)
        if not b:
            break
        got += b
    return status_of(got)


def hold(port, n, secs):
    first = socket.create_connection(("127.0.0.1", port))
    first.settimeout(5)
    print("first", ask(first))
    sys.stdout.flush()
    held = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        held.append(s)
    time.sleep(secs / 2)
    try:
        print("during", ask(first))
    except OSError as e:
        print("during 0", e)
    time.sleep(secs / 2)
    for s in held:
        s.close()
    t0 = time.time()
    st = "0"
    while time.time() - t0 < 10 and st != "200":
        try:
            s = socket.create_connection(("127.0.0.1", port))
            s.settimeout(2)
            st = ask(s)
            s.close()
        except OSError:
            time.sleep(0.05)
    print("after", st, "%.2f" % (time.time() - t0))


def readable(s, secs):
    p = select.poll()  # not select(): descriptors beyond 1024
    p.register(s, select.POLLIN)
    return bool(p.poll(secs * 1000))


def take(c):
    # What was answered so far (a reset could drop it later); never blocks.
    try:
        while readable(c["s"], 0):
            b = c["s"].recv(65536)
            if not b:
                return
            c["got"] += b
    except OSError:
        pass


def bodies(port, n, size, piece, every, headers):
    conns = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.settimeout(10)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  b"Content-Type: application/json\r\nContent-Length: %d\r\n%s\r\n" % (size, headers))
        conns.append({"s": s, "sent": 0, "ok": True, "got": b""})
    chunk = b"x" * piece
    while any(c["ok"] and c["sent"] < size for c in conns):
        for c in conns:
            if c["ok"] and c["sent"] < size:
                k = min(piece, size - c["sent"])
                try:
                    c["s"].sendall(chunk[:k])
                    c["sent"] += k
                except OSError:
                    c["ok"] = False
                take(c)
        if every > 0:
            time.sleep(every)
    for c in conns:
        try:
            while True:
                b = c["s"].recv(65536)
                if not b:
                    break
                c["got"] += b
        except OSError:
            pass
        print(status_of(c["got"]))


def trickle(port, n, every, secs, head, data):
    conns = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(head)
        conns.append({"s": s, "t0": time.time(), "got": b"", "end": -1, "k": 0})
    t_end = time.time() + secs
    next_send = time.time() + every
    while time.time() < t_end and any(c["end"] < 0 for c in conns):
        live = [c for c in conns if c["end"] < 0]
        wait = max(0, min(next_send, t_end) - time.time())
        p = select.poll()
        for c in live:
            p.register(c["s"], select.POLLIN)
        ready = set(fd for fd, _ in p.poll(wait * 1000))
        for c in live:
            if c["s"].fileno() in ready:
                try:
                    b = c["s"].recv(65536)
                except OSError:
                    b = b""
                if b:
                    c["got"] += b
                else:
                    c["end"] = time.time() - c["t0"]
        if time.time() >= next_send:
            for c in conns:
                if c["end"] < 0:
                    try:
                        c["s"].send(data[c["k"] % len(data):][:1])
                        c["k"] += 1
                    except OSError:
                        pass
            next_send += every
    for c in conns:
        print("%.3f %s" % (c["end"], status_of(c["got"])))


def streams(port, n, content):
    body = ('{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"%s"}]}'
            % content).encode()
    req = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
           b"x-aiorch-providers: openai\r\ncontent-length: %d\r\n\r\n" % len(body)) + body
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(req)
        socks.append(s)
    print("SENT")
    sys.stdout.flush()
    time.sleep(3600)


def main(argv):
    mode, port = argv[1], int(argv[2])
    if mode == "hold":
        hold(port, int(argv[3]), float(argv[4]))
    elif mode == "bodies":
        bodies(port, int(argv[3]), int(argv[4]), int(argv[5]), float(argv[6]), unescape(argv[7]))
    elif mode == "trickle":
        trickle(port, int(argv[3]), float(argv[4]), float(argv[5]), unescape(argv[6]), argv[7].encode())
    elif mode == "streams":
        streams(port, int(argv[3]), argv[4])
    else:
        sys.exit("unknown mode " + mode)


main(sys.argv)
