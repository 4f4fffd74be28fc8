#!/usr/bin/env python3
"""Independent check of the checkpoint, signed-command, signed-head, live-state, ring Ready, replication-frame and replication-journal vectors in docs/vectors/.

Rebuilds the documented bodies from the field values in docs/formats.md §1.5, §1.8 and §3
with nothing but struct/hashlib (and a BLAKE3 written here from the specification, for the
live-state LtHash), parses the envelopes, and verifies every Ed25519 signature with the
`cryptography` package (not ring). Exit 0 only if all agree.

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


# --- Live-state digest (formats.md §1.8): LtHash over BLAKE3-XOF elements. -------------
# BLAKE3 from its specification (single-chunk inputs are all the vectors need).
B3_IV = [0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A,
         0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19]
B3_PERM = [2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8]
CHUNK_START, CHUNK_END, ROOT = 1, 2, 8
DERIVE_KEY_CONTEXT, DERIVE_KEY_MATERIAL = 32, 64
M32 = 0xFFFFFFFF


def _rotr(x, n):
    return ((x >> n) | (x << (32 - n))) & M32


def _g(s, a, b, c, d, x, y):
    s[a] = (s[a] + s[b] + x) & M32
    s[d] = _rotr(s[d] ^ s[a], 16)
    s[c] = (s[c] + s[d]) & M32
    s[b] = _rotr(s[b] ^ s[c], 12)
    s[a] = (s[a] + s[b] + y) & M32
    s[d] = _rotr(s[d] ^ s[a], 8)
    s[c] = (s[c] + s[d]) & M32
    s[b] = _rotr(s[b] ^ s[c], 7)


def _compress(cv, block, counter, block_len, flags):
    m = list(struct.unpack("<16I", block.ljust(64, b"\0")))
    s = list(cv) + B3_IV[:4] + [counter & M32, (counter >> 32) & M32, block_len, flags]
    for r in range(7):
        _g(s, 0, 4, 8, 12, m[0], m[1]); _g(s, 1, 5, 9, 13, m[2], m[3])
        _g(s, 2, 6, 10, 14, m[4], m[5]); _g(s, 3, 7, 11, 15, m[6], m[7])
        _g(s, 0, 5, 10, 15, m[8], m[9]); _g(s, 1, 6, 11, 12, m[10], m[11])
        _g(s, 2, 7, 8, 13, m[12], m[13]); _g(s, 3, 4, 9, 14, m[14], m[15])
        m = [m[i] for i in B3_PERM]
    return [s[i] ^ s[i + 8] for i in range(8)] + [s[i + 8] ^ cv[i] for i in range(8)]


def blake3_xof(key_words, data, flags, n):
    assert len(data) <= 1024, "single chunk only"
    blocks = [data[i:i + 64] for i in range(0, len(data), 64)] or [b""]
    cv = key_words
    for i, b in enumerate(blocks[:-1]):
        cv = _compress(cv, b, 0, 64, flags | (CHUNK_START if i == 0 else 0))[:8]
    last = blocks[-1]
    last_flags = flags | CHUNK_END | ROOT | (CHUNK_START if len(blocks) == 1 else 0)
    out = b""
    t = 0
    while len(out) < n:
        out += struct.pack("<16I", *_compress(cv, last, t, len(last), last_flags))
        t += 1
    return out[:n]


assert blake3_xof(B3_IV, b"", 0, 32).hex() == (
    "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"), "BLAKE3 self-check"


def derive_key_xof(context, material, n):
    ctx_key = blake3_xof(B3_IV, context.encode(), DERIVE_KEY_CONTEXT, 32)
    return blake3_xof(list(struct.unpack("<8I", ctx_key)), material, DERIVE_KEY_MATERIAL, n)


CONTEXT = "Mayfly ledger 2026-12 live-state element v1"


def element(key, stored):
    material = struct.pack(">H", len(key)) + key + struct.pack(">I", len(stored)) + stored
    return struct.unpack("<1024H", derive_key_xof(CONTEXT, material, 2048))


entries = [(b"acct/a", b"\x01" + struct.pack(">Q", 1) + b"100"),
           (b"acct/b", b"\x02" + struct.pack(">Q", 2))]
lanes = [0] * 1024
for k, v in entries:
    lanes = [(x + y) & 0xFFFF for x, y in zip(lanes, element(k, v))]
state = b"MFSD" + bytes([1]) + struct.pack(">Q", len(entries)) + struct.pack("<1024H", *lanes)
assert state == vec("state-2.hex"), "state-2: digest differs"
assert hashlib.sha256(state).digest() == vec("state-2.hash"), "state-2: hash differs"
assert struct.pack("<32H", *element(*entries[0])[:32]) == vec("state-element-acct-a.hex")
print("ok  state-2: LtHash of 2 entries (BLAKE3 derive-key XOF), SHA-256")

# Version-2 head: group 3 over fixed tips, state hash of state-2, seed 0x01.
h = vec("head-v2-3.hex")
expected = (b"MFHD" + bytes([2, 1]) + struct.pack(">QQ", 3, 3) + b"\x33" * 32
            + struct.pack(">Q", 1) + b"\x11" * 32 + struct.pack(">Q", 1_700_000_003_000_000_000)
            + pub_from_seed(0x01) + hashlib.sha256(state).digest())
assert len(h) == 166 + 64 and h[:166] == expected, "head-v2-3: fields differ"
Ed25519PublicKey.from_public_bytes(pub_from_seed(0x01)).verify(h[166:], h[:166])
print("ok  head-v2-3: version 2, state hash, signature by seed 0x01")

# Version-3 head: the same fields with version 3, then the epoch (2), seed 0x01.
h = vec("head-v3-3.hex")
expected = b"MFHD" + bytes([3]) + expected[5:] + struct.pack(">Q", 2)
assert len(h) == 174 + 64 and h[:174] == expected, "head-v3-3: fields differ"
Ed25519PublicKey.from_public_bytes(pub_from_seed(0x01)).verify(h[174:], h[:174])
print("ok  head-v3-3: version 3, state hash, epoch 2, signature by seed 0x01")

# Promotion head (kind 0x03): head-v3-3's tips and state as group 4 of epoch 3, promoting
# from group 3 whose head is head-v3-3 (by SHA-256), command hash 0xc0 x 32, co-signers the
# admin keys of seeds 0x11 and 0x12 in increasing order, signed by seed 0x02 (the promoted
# node's key).
p = vec("head-promotion-4.hex")
cos = sorted([pub_from_seed(0x11), pub_from_seed(0x12)])
expected = (b"MFHD" + bytes([3, 3]) + struct.pack(">QQ", 4, 3) + b"\x33" * 32
            + struct.pack(">Q", 1) + b"\x11" * 32 + struct.pack(">Q", 1_700_000_004_000_000_000)
            + pub_from_seed(0x02) + hashlib.sha256(state).digest() + struct.pack(">Q", 3)
            + struct.pack(">Q", 3) + hashlib.sha256(h).digest() + b"\xc0" * 32
            + bytes([len(cos)]) + b"".join(cos))
assert len(p) == len(expected) + 64 and p[:-64] == expected, "head-promotion-4: fields differ"
Ed25519PublicKey.from_public_bytes(pub_from_seed(0x02)).verify(p[-64:], p[:-64])
print("ok  head-promotion-4: promotion to epoch 3 from head-v3-3, 2 co-signers, signature by seed 0x02")

# Sealed-key file (formats.md §4.1): fields of the unit test's sample, trailing SHA-256.
b = b"MFSEALED" + bytes([1]) + b"\x11" * 32 + struct.pack(">H", 0x000B) + bytes([3])
for p in (7, 8, 9):
    b += bytes([p]) + bytes([p]) * 32
for part in (b"\xaa" * 4, b"\xbb" * 3):
    b += struct.pack(">H", len(part)) + part
assert b + hashlib.sha256(b).digest() == vec("sealed-key-1.hex"), "sealed-key-1 differs"
print("ok  sealed-key-1: layout and trailing SHA-256")

# Sealed to three boot states (version 2): the first state as above, then m = 2 and the
# three values of each further state (PCR 7 unchanged, 8 and 9 of two more boots).
b = b"MFSEALED" + bytes([2]) + b"\x11" * 32 + struct.pack(">H", 0x000B) + bytes([3])
for p in (7, 8, 9):
    b += bytes([p]) + bytes([p]) * 32
b += bytes([2])
for state in ((0x07, 0x18, 0x19), (0x07, 0x28, 0x29)):
    for v in state:
        b += bytes([v]) * 32
for part in (b"\xaa" * 4, b"\xbb" * 3):
    b += struct.pack(">H", len(part)) + part
assert b + hashlib.sha256(b).digest() == vec("sealed-key-2.hex"), "sealed-key-2 differs"
print("ok  sealed-key-2: three boot states (version 2), trailing SHA-256")

# Expected-PCR file (formats.md §4.2): the test boot's values from first principles, a PCR
# extend being SHA-256(old || digest) from 32 zero bytes.
def extend(*digests):
    v = bytes(32)
    for d in digests:
        v = hashlib.sha256(v + d).digest()
    return v


pcrs = {7: bytes(32),
        8: extend(hashlib.sha256(b"linux /boot/Image console=hvc0 ro").digest()),
        9: extend(hashlib.sha256(b"mayfly test dom0 kernel image").digest())}
lines = [l for l in (V / "expected-pcrs-1.txt").read_text().split("\n")
         if l and not l.startswith("#")]
assert lines[:2] == ["mayfly-expected-pcrs 1", "bank sha256"], "expected-pcrs-1: header"
assert lines[2:] == ["state " + " ".join(f"pcr{i}={v.hex()}" for i, v in sorted(pcrs.items()))], \
    "expected-pcrs-1: values differ"
digest = hashlib.sha256(b"".join(v for _, v in sorted(pcrs.items()))).digest()
assert digest == vec("expected-pcrs-1.digest"), "expected-pcrs-1: PCR digest differs"
print("ok  expected-pcrs-1: PCR 7/8/9 of the test boot, PolicyPCR/quote digest")

# PROXY protocol v2 headers (docs/formats.md section 5), rebuilt from the documented fields.
SIG = b"\r\n\r\n\x00\r\nQUIT\n"
assert vec("proxy-v2-tcp4.hex") == (SIG + bytes([0x21, 0x11]) + struct.pack(">H", 12)
                                    + bytes([203, 0, 113, 7, 192, 0, 2, 10])
                                    + struct.pack(">HH", 51234, 8450)), "proxy-v2-tcp4 differs"
v6 = lambda last: bytes.fromhex("20010db8" + "00" * 11) + bytes([last])
assert vec("proxy-v2-tcp6.hex") == (SIG + bytes([0x21, 0x21]) + struct.pack(">H", 42)
                                    + v6(7) + v6(1) + struct.pack(">HH", 443, 8450)
                                    + bytes([0x04, 0x00, 0x03, 0, 0, 0])), "proxy-v2-tcp6 differs"
assert vec("proxy-v2-local.hex") == SIG + bytes([0x20, 0x00, 0x00, 0x00]), "proxy-v2-local differs"
print("ok  proxy-v2-tcp4, proxy-v2-tcp6, proxy-v2-local: PROXY protocol v2 headers")

# Update bundle (docs/formats.md "Update bundle"): version 2, parts rootfs "hsqs", xen "XEN",
# vmlinux "LINUX", pcrs "PCRS\n", signed by the update key of seed 0x17.
b = vec("update-bundle.hex")
manifest = bytes([13]) + b"mayfly-x86_64" + struct.pack(">Q", 2) + bytes([4])
parts = [(b"rootfs", b"hsqs"), (b"xen", b"XEN"), (b"vmlinux", b"LINUX"), (b"pcrs", b"PCRS\n")]
for name, data in parts:
    manifest += bytes([len(name)]) + name + struct.pack(">Q", len(data)) + hashlib.sha256(data).digest()
head = b"MAYFLYUP" + struct.pack(">HI", 1, len(manifest))
assert b[:14 + len(manifest)] == head + manifest, "update-bundle: header or manifest differs"
sig = b[14 + len(manifest):14 + len(manifest) + 64]
assert b[14 + len(manifest) + 64:] == b"".join(d for _, d in parts), "update-bundle: parts differ"
Ed25519PublicKey.from_public_bytes(pub_from_seed(0x17)).verify(
    sig, b"mayfly-update-manifest-v1\x00" + manifest)
print("ok  update-bundle: manifest of 4 parts, SHA-256s, signature by seed 0x17")

# Ring Ready, protocol version 2 (docs/formats.md section 2.3): the guest's handler list.
names = [b"kv_get", b"transfer"]
ready_body = struct.pack(">HI", 2, len(names)) + b"".join(struct.pack(">I", len(n)) + n for n in names)
assert names == sorted(set(names)), "Ready names must be strictly ascending"
assert vec("ready-2.hex") == (b"MFWM" + struct.pack(">HHII", 1, 0x0001, 1, len(ready_body))
                              + ready_body), "ready-2 differs"
print("ok  ready-2: ring Ready with its handler list")

# Replication cursors frame (docs/formats.md section 6.1): the SIEM exporters' cursors
# local-relay = 7 and soc-tls = 1841, names strictly increasing.
cursors = [(b"local-relay", 7), (b"soc-tls", 1841)]
assert cursors == sorted(set(cursors)), "cursor names must be strictly ascending"
cbody = struct.pack(">H", len(cursors)) + b"".join(
    bytes([len(n)]) + n + struct.pack(">Q", seq) for n, seq in cursors)
assert vec("replication-cursors.hex") == (b"MFRP" + bytes([1, 0x06]) + struct.pack(">I", len(cbody))
                                          + cbody), "replication-cursors differs"
print("ok  replication-cursors: replication frame 0x06 with two exporter cursors")

# Replication confirm and abandon frames (docs/formats.md section 6.1): a u64 group.
assert vec("replication-confirm.hex") == (b"MFRP" + bytes([1, 0x09]) + struct.pack(">IQ", 8, 1234567)), \
    "replication-confirm differs"
assert vec("replication-abandon.hex") == (b"MFRP" + bytes([1, 0x0A]) + struct.pack(">IQ", 8, 1234568)), \
    "replication-abandon differs"
print("ok  replication-confirm, replication-abandon: replication frames 0x09 and 0x0a")

# The standby's journal (docs/formats.md section 6.4): a confirm record of group 1,234,567,
# then the SHA-256 of everything before it.
jrec = b"MFRJ" + bytes([1, 0x03]) + struct.pack(">IQ", 8, 1234567)
assert vec("replication-journal-confirm.hex") == jrec + hashlib.sha256(jrec).digest(), \
    "replication-journal-confirm differs"
print("ok  replication-journal-confirm: a journal confirm record and its digest")

print("all vectors agree")
sys.exit(0)
