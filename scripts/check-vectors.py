#!/usr/bin/env python3
"""Independent check of the checkpoint, signed-command and key-rotation vectors in docs/vectors/.

Rebuilds the documented bodies from the field values in docs/formats.md §1.5 and §3
with nothing but struct/hashlib, parses the envelopes, and verifies every Ed25519
signature with the `cryptography` package (not ring). Exit 0 only if all agree.

    python3 scripts/check-vectors.py
"""
import hashlib
import pathlib
import struct
import sys

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives import serialization

V = pathlib.Path(__file__).resolve().parent.parent / "docs" / "vectors"


def vec(name):
    return bytes.fromhex((V / name).read_text().strip())


def pub_from_seed(seed_byte):
    k = Ed25519PrivateKey.from_private_bytes(bytes([seed_byte]) * 32)
    return k.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def body(nonce, issued, expires, command, args):
    out = b"MFAC" + bytes([1, 1]) + nonce + struct.pack(">QQ", issued, expires)
    out += bytes([len(command)]) + command.encode()
    out += bytes([len(args)])
    for name in sorted(args):
        v = args[name].encode()
        out += bytes([len(name)]) + name.encode() + struct.pack(">I", len(v)) + v
    return out


def parse_envelope(b):
    assert b[:4] == b"MFAE" and b[4] == 1, "envelope header"
    (n,) = struct.unpack(">I", b[5:9])
    body_bytes = b[9 : 9 + n]
    rest = b[9 + n :]
    count = rest[0]
    sigs = []
    for i in range(count):
        entry = rest[1 + 96 * i : 1 + 96 * (i + 1)]
        sigs.append((entry[:32], entry[32:]))
    assert len(rest) == 1 + 96 * count, "trailing bytes"
    keys = [k for k, _ in sigs]
    assert keys == sorted(set(keys)), "signers strictly increasing"
    return body_bytes, sigs


def check_envelope(name, expected_body, signer_seeds):
    body_bytes, sigs = parse_envelope(vec(f"command-{name}.hex"))
    assert body_bytes == expected_body, f"{name}: body differs from the documented fields"
    assert hashlib.sha256(body_bytes).digest() == vec(f"command-{name}.body.sha256"), name
    assert {k for k, _ in sigs} == {pub_from_seed(s) for s in signer_seeds}, name
    for key, sig in sigs:
        Ed25519PublicKey.from_public_bytes(key).verify(sig, body_bytes)
    print(f"ok  command-{name}: body, SHA-256 and {len(sigs)} signature(s)")


ISSUED = 1_700_000_000_000_000_000
check_envelope(
    "status",
    body(b"\xa1" * 16, ISSUED, ISSUED + 300_000_000_000, "status", {}),
    [0x11],
)
assert vec("command-status.body.hex") == body(
    b"\xa1" * 16, ISSUED, ISSUED + 300_000_000_000, "status", {}
)
check_envelope(
    "rollback",
    body(b"\xb2" * 16, ISSUED, ISSUED + 600_000_000_000, "rollback",
         {"seq": "3", "cascade": "true"}),
    [0x11, 0x12],
)
assert vec("admin-key-11.pub") == pub_from_seed(0x11)
assert vec("admin-key-12.pub") == pub_from_seed(0x12)

# Signed heads: head-1 (group head) and head-rotation-2 (signed by the old key, naming the
# new one).
for name, kind, length, seed, next_seed in [
    ("head-1", 1, 134, 0x01, None),
    ("head-rotation-2", 2, 166, 0x01, 0x02),
]:
    h = vec(f"{name}.hex")
    assert h[:4] == b"MFHD" and h[4] == 1 and h[5] == kind, name
    assert len(h) == length + 64, name
    signer = h[102:134]
    assert signer == pub_from_seed(seed), name
    if next_seed is not None:
        assert h[134:166] == pub_from_seed(next_seed) == vec("head-key-2.pub"), name
    Ed25519PublicKey.from_public_bytes(signer).verify(h[length:], h[:length])
    # The signed tips are the documented chain hashes.
    assert h[22:54] == vec("checkpoint-2.hash") and h[62:94] == vec("audit-1.hash"), name
    print(f"ok  {name}: kind {kind}, signature by seed {seed:#04x}")

# Checkpoints: checkpoint 1 of formats.md §1.3 rebuilt from its documented fields, as
# version 1 (no client) and as version 2 naming the client spki:ab…ab (the differences:
# the version byte, the u8-prefixed client after the handler, and a u64 domain number).
def checkpoint_1(client=None):
    req = b'{"from":"a","to":"b","amount":5}'
    out = b"MFCP" + bytes([2 if client else 1, 1]) + struct.pack(">Q", 1) + bytes(32)
    out += b"\x11" * 16 + bytes([8]) + b"transfer"
    if client:
        out += bytes([len(client)]) + client
    out += (struct.pack(">Q", 7) if client else struct.pack(">I", 7)) + b"\x22" * 32 + b"\x55" * 32
    out += struct.pack(">QQ", 1_700_000_000_000_000_000, 1_700_000_000_000_500_000)
    out += hashlib.sha256(req).digest() + struct.pack(">I", len(req)) + req
    out += b"\x01" + struct.pack(">I", 2) + b"ok"
    out += struct.pack(">I", 2)
    for k in (b"acct/a", b"acct/b"):
        out += struct.pack(">H", len(k)) + k + bytes(8)
    out += struct.pack(">I", 2)
    for k, v in ((b"acct/a", b"95"), (b"acct/b", b"105")):
        out += struct.pack(">H", len(k)) + k + bytes(8) + b"\x00\x01" + struct.pack(">I", len(v)) + v
    return out


for name, client in [("checkpoint-1", None), ("checkpoint-client-1", b"spki:" + b"ab" * 32)]:
    enc = checkpoint_1(client)
    assert vec(f"{name}.hex") == enc, f"{name}: bytes differ from the documented fields"
    assert vec(f"{name}.hash") == hashlib.sha256(bytes(32) + enc).digest(), name
    print(f"ok  {name}: version {enc[4]}, chain hash")

print("all vectors agree")
sys.exit(0)
