#!/usr/bin/env python3
"""Issue 8, section 5: the reply-flood attack, and what another client sees meanwhile.

Starts `ringcast serve --dev` on a loopback port, fills channel "big" with 100 publications of 60 KB
(through the HTTP API), then:
  * baseline: one prober client measures `presence_stats` round trips, one at a time;
  * attack: ATTACKERS clients, each ROUNDS times, connect and send one ~10 KB frame of 200 `history`
    commands (limit 100) without reading; the prober keeps measuring.
Prints the prober's round-trip percentiles in both phases, the attackers' close codes, and the server's
RSS (VmRSS, and its peak VmHWM) from /proc. Standard library only; bounded in time and count.

    python3 scripts/probe-reply-flood.py target/release/ringcast [ATTACKERS] [ROUNDS] [LIMIT]

LIMIT is each history command's limit (default 100: one reply is 6 MB, over the 1 MiB queue limit by
itself; 10: 600 KB replies, the second passes it).
"""

import base64
import http.client
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time

HOST = "127.0.0.1"


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Ws:
    """A minimal client-side WebSocket (text frames, masked), enough for the client protocol."""

    def __init__(self, port, timeout=15.0):
        self.s = socket.create_connection((HOST, port), timeout=timeout)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16)).decode()
        self.s.sendall(
            (
                f"GET /connection/websocket HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.s.recv(4096)
            if not chunk:
                raise ConnectionError("closed during handshake")
            buf += chunk
        head, self.buf = buf.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise ConnectionError(head.decode(errors="replace"))

    def send(self, text, opcode=1):
        payload = text.encode() if isinstance(text, str) else text
        n = len(payload)
        mask = os.urandom(4)
        if n < 126:
            hdr = bytes([0x80 | opcode, 0x80 | n])
        elif n < 65536:
            hdr = bytes([0x80 | opcode, 0x80 | 126]) + struct.pack(">H", n)
        else:
            hdr = bytes([0x80 | opcode, 0x80 | 127]) + struct.pack(">Q", n)
        keystream = (mask * (n // 4 + 1))[:n]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(keystream, "big")).to_bytes(n, "big") if n else b""
        self.s.sendall(hdr + mask + masked)

    def _need(self, n):
        while len(self.buf) < n:
            chunk = self.s.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk

    def frame(self):
        """(opcode, payload) of the next frame."""
        self._need(2)
        b0, b1 = self.buf[0], self.buf[1]
        n, off = b1 & 0x7F, 2
        if n == 126:
            self._need(4)
            n, off = struct.unpack(">H", self.buf[2:4])[0], 4
        elif n == 127:
            self._need(10)
            n, off = struct.unpack(">Q", self.buf[2:10])[0], 10
        self._need(off + n)
        payload, self.buf = self.buf[off : off + n], self.buf[off + n :]
        return b0 & 0x0F, payload

    def reply(self, want_id):
        while True:
            op, payload = self.frame()
            if op == 8:
                return {"closed": struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else None}
            if op == 1:
                for line in payload.decode().split("\n"):
                    if line.strip():
                        v = json.loads(line)
                        if v.get("id") == want_id:
                            return v

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


def rss(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS", "VmHWM")):
                k, v = line.split(":")
                out[k] = int(v.split()[0]) // 1024
    return out


def percentiles(samples):
    s = sorted(samples)
    if not s:
        return "no samples"
    pick = lambda q: s[min(len(s) - 1, int(q * len(s)))] * 1000
    return f"n={len(s)} p50={pick(0.5):.2f} ms p99={pick(0.99):.2f} ms max={s[-1] * 1000:.2f} ms"


def main():
    binary = sys.argv[1]
    attackers = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
    limit = int(sys.argv[4]) if len(sys.argv) > 4 else 100
    port = free_port()
    server = subprocess.Popen(
        [binary, "serve", "--dev", "--listen", f"{HOST}:{port}", "--api-key", "k", "--log-level", "warn"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection((HOST, port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        data = json.dumps("x" * 60_000)
        api = http.client.HTTPConnection(HOST, port, timeout=10)
        for _ in range(100):
            api.request("POST", "/api/publish", body=f'{{"channel":"big","data":{data}}}', headers={"X-API-Key": "k"})
            r = api.getresponse()
            r.read()
            assert r.status == 200, r.status
        print("history filled:", rss(server.pid))

        prober = Ws(port)
        prober.send(json.dumps({"id": 1, "connect": {}}))
        assert "connect" in prober.reply(1)
        next_id = [2]

        def probe_once():
            i = next_id[0]
            next_id[0] += 1
            t = time.perf_counter()
            prober.send(json.dumps({"id": i, "presence_stats": {"channel": "big"}}))
            r = prober.reply(i)
            assert "closed" not in r, r
            return time.perf_counter() - t

        baseline = [probe_once() for _ in range(2000)]
        print("baseline presence_stats:", percentiles(baseline))

        frame = "\n".join(json.dumps({"id": i, "history": {"channel": "big", "limit": limit}}) for i in range(2, 202))
        codes = {}
        lock = threading.Lock()

        def attack():
            for _ in range(rounds):
                w = Ws(port)
                try:
                    w.send(json.dumps({"id": 1, "connect": {}}))
                    w.reply(1)
                    w.send(frame)
                    # Do not read replies; wait for the close (the kernel buffers what was written).
                    time.sleep(0.2)
                    code = w.reply(-1).get("closed")
                except (EOFError, OSError):
                    code = "eof"
                finally:
                    w.close()
                with lock:
                    codes[code] = codes.get(code, 0) + 1

        threads = [threading.Thread(target=attack) for _ in range(attackers)]
        during = []
        started = time.perf_counter()
        for t in threads:
            t.start()
        while any(t.is_alive() for t in threads) and len(during) < 100_000:
            during.append(probe_once())
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
        print(f"during attack ({attackers} attackers x {rounds} frames of 200 history commands, limit {limit}, {len(frame)} B each):")
        print(f"  attack lasted {elapsed:.2f} s")
        print("  presence_stats:", percentiles(during))
        print("  attackers' close codes:", codes)
        print("  server memory (MiB):", rss(server.pid))
    finally:
        server.terminate()
        server.wait(timeout=15)


if __name__ == "__main__":
    main()
