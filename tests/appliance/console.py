#!/usr/bin/env python3
"""Host-side helpers of the appliance boot test for the agent's admin console, reached through
QEMU's forwarded port and the test hook's relay (tests/appliance/README.md). The console's
framing is dom0-agent/command/src/frame.rs: a request is u32 BE length || envelope (or
the 4 bytes "MFAH", framed the same way); each answer frame is u32 BE length || JSON.

  console.py hello PORT
      the appliance's identity key (the HELLO answer), 64 hex digits
  console.py tamper PORT LISTEN_PORT READY_FILE
      serves one connection on 127.0.0.1:LISTEN_PORT, passes it to 127.0.0.1:PORT and
      changes one hex digit of the `attest` structure in the answer's TPM quote (a quote
      altered on the way); touches READY_FILE once listening
  console.py audit-field FILE EVENT FIELD
      from an `audit export --out FILE` (JSON lines): FIELD of each record EVENT, one a line
"""
import json
import socket
import struct
import sys

MAX_FRAME = 16 << 20
TIMEOUT = 300


def read_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError("connection closed after %d of %d bytes" % (len(buf), n))
        buf += chunk
    return buf


def read_frame(s):
    (n,) = struct.unpack(">I", read_exact(s, 4))
    if n == 0 or n > MAX_FRAME:
        raise ValueError("frame length %d out of bounds" % n)
    return read_exact(s, n)


def write_frame(s, body):
    s.sendall(struct.pack(">I", len(body)) + body)


def hello(port):
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        write_frame(s, b"MFAH")
        f = json.loads(read_frame(s))
    key = f.get("result", {}).get("appliance", "")
    if len(key) != 64:
        raise ValueError("no identity key in the HELLO answer: %r" % f)
    print(key)


def tamper(port, listen_port, ready):
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", listen_port))
    srv.listen(1)
    srv.settimeout(TIMEOUT)
    open(ready, "w").close()
    client, _ = srv.accept()
    client.settimeout(TIMEOUT)
    with client, socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as up:
        write_frame(up, read_frame(client))
        changed = False
        while True:
            raw = read_frame(up)
            f = json.loads(raw)
            quote = (f.get("result") or {}).get("quote") if f.get("type") == "result" else None
            if isinstance(quote, dict) and isinstance(quote.get("attest"), str) and quote["attest"]:
                a = quote["attest"]
                # The last digit: part of the PCR digest, inside what the AK signed.
                quote["attest"] = a[:-1] + ("0" if a[-1] != "0" else "1")
                raw = json.dumps(f).encode()
                changed = True
            write_frame(client, raw)
            if f.get("type") == "result":
                break
    print("changed the quote" if changed else "no quote in the answer")
    return 0 if changed else 1


def audit_field(path, event, field):
    for line in open(path):
        line = line.strip()
        if not line:
            continue
        r = json.loads(line)
        if r.get("event") != event:
            continue
        fields = r.get("fields")
        if isinstance(fields, dict):
            value = fields.get(field)
        else:
            value = next((v for k, v in (fields or []) if k == field), None)
        if value is not None:
            print(value)


def main():
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "hello" and len(sys.argv) == 3:
        hello(int(sys.argv[2]))
        return 0
    if cmd == "tamper" and len(sys.argv) == 5:
        return tamper(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    if cmd == "audit-field" and len(sys.argv) == 5:
        audit_field(sys.argv[2], sys.argv[3], sys.argv[4])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
