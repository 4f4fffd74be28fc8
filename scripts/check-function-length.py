#!/usr/bin/env python3
"""No function over 80 lines on the transaction path (issue 20): every function in the
files a transaction passes through, from the client API's network edge to the ledger's
commit and the domain that runs it. A function's length is counted from its `fn` line to
its closing brace, comments and blank lines included. Test modules do not count: an inline
`#[cfg(test)] mod m { ... }` (other attributes may stand between), and the file of an
out-of-line `#[cfg(test)] mod m;` declared by a file on the path. Prints each function over
the limit; exits 1 if any."""
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 80

# The transaction path, in the order a request meets it. A directory means every .rs file
# under it (bin/ targets and test modules' files excluded).
PATH = [
    "dom0-agent/api/src/net.rs",        # connection, TLS, PROXY header
    "dom0-agent/api/src/body.rs",       # the request body under its limits
    "dom0-agent/api/src/routes.rs",     # routing, admission, idempotency
    "dom0-agent/api/src/shared.rs",
    "dom0-agent/executor/src",          # admission, attempts, session, retirement
    "dom0-agent/policy/src/eval.rs",    # every operation and commit is decided
    "dom0-agent/ledger/src/txn.rs",     # the transaction's reads, writes and scans
    "dom0-agent/ledger/src/job.rs",     # what it hands the committer
    "dom0-agent/ledger/src/value.rs",
    "dom0-agent/ledger/src/commit.rs",  # the committer thread: batches into groups
    "dom0-agent/ledger/src/group.rs",   # one group: validate, write, sign, fsync
    "dom0-agent/ledger/src/idempotency.rs",
    "dom0-agent/ledger/src/state.rs",   # the live-state digest each write updates
]

# The backends' part: the domain a transaction runs in is taken, talked to and retired.
PATH += [
    "dom0-agent/domain/src",            # the Domain/DomainBackend contract, quarantine, back-off
    "dom0-agent/xen-backend/src/backend.rs",  # take, hand-out, retire, quarantine
    "dom0-agent/xen-backend/src/pool.rs",     # the pool a domain is taken from, refilled per take
    "dom0-agent/xen-backend/src/build.rs",    # each transaction's domain built, to its Ready
    "dom0-agent/xen-backend/src/domain.rs",   # ... its handle, its end, its clean-up
    "dom0-agent/xen-backend/src/config.rs",   # its xl config, written per build
    "dom0-agent/xen/src",               # grants, event channel, xenstore, domctl, PV build
    "dom0-agent/sandbox/src/backend",   # the agent side: take, exchange, retire, refill, supervise
    "dom0-agent/sandbox/src/clone.rs",  # a clone's ring and handle
    "dom0-agent/sandbox/src/sys.rs",    # pidfd and eventfd calls on each clone
    "dom0-agent/sandbox-proto/src",     # every control message, encoded and decoded
    "dom0-agent/sandbox-zygote/src/zygote.rs",   # the zygote forks and reaps each clone (its
                                                 # start-up, prepare, is in the file too)
    "dom0-agent/sandbox-zygote/src/child.rs",    # each clone confined before the guest's code
    "dom0-agent/sandbox-zygote/src/private.rs",  # the zygote's per-clone tables
    "dom0-agent/sandbox-zygote/src/sys.rs",
    # The guest side a transaction runs in.
    "domu-shim/ring/src",               # the ring both sides speak, its wire format
    "domu-shim/shim/src",               # the guest runtime: Ready, requests, handlers
    "domu-shim/sdk/src",                # the handlers' view of a transaction
    "domu-shim/handlers/src",           # the handlers themselves
    "domu-shim/names/src",              # the handler-name rule
    "domu-shim/pv-guest/src",           # the Mayfly PV guest kernel: boot, ring, runtime
]
# Left out on purpose, as start-up or housekeeping rather than a transaction's path: the
# backends' reconcilers (xen-backend/src/reconcile.rs, sandbox/src/reconcile.rs), the
# sandbox's cgroup, uid claim, zygote spawn and config (sandbox/src/{cgroup/,uids.rs,
# spawn.rs,config.rs}: a clone costs no cgroup work, it inherits the group at fork), and the
# template's start-up (sandbox-zygote/src/{hugecode,seccomp}.rs: once per zygote).

FN = re.compile(
    r'^\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?(extern\s+"C"\s+)?fn\s+(\w+)'
)


def strip_line(line):
    line = re.sub(r'"(\\.|[^"\\])*"', '""', line)
    line = re.sub(r"'(\\.|[^'\\])'", "''", line)
    return re.sub(r"//.*", "", line)


TEST_MOD = re.compile(r"(pub(\([^)]*\))?\s+)?mod\s+(\w+)\s*([{;])")


def skip_attribute(text, i):
    """The index after the `#[...]` starting at `i` (brackets balanced)."""
    depth = 0
    while i < len(text):
        if text[i] == "[":
            depth += 1
        elif text[i] == "]":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return i


def test_modules(text):
    """Each `#[cfg(test)]` module: (start, index after `{` or `;`, name, is_inline)."""
    for m in re.finditer(r"#\[cfg\(test\)\]", text):
        i = m.end()
        while True:
            ws = re.match(r"\s*", text[i:])
            i += ws.end()
            if text.startswith("#[", i):
                i = skip_attribute(text, i)
                continue
            break
        mod = TEST_MOD.match(text, i)
        if mod:
            yield m.start(), mod.end(), mod.group(3), mod.group(4) == "{"


def blank_inline_tests(text):
    """`text` with every inline test module's lines emptied (line numbers kept)."""
    lines = text.split("\n")
    for start, after, _, inline in test_modules(text):
        if not inline:
            continue
        first = text.count("\n", 0, start)
        brace = after - 1
        k = text.count("\n", 0, brace)
        chunk = lines[k][brace - (text.rfind("\n", 0, brace) + 1):]
        depth = 0
        while True:
            for ch in strip_line(chunk):
                depth += (ch == "{") - (ch == "}")
            if depth <= 0 or k + 1 >= len(lines):
                break
            k += 1
            chunk = lines[k]
        lines[first:k + 1] = [""] * (k + 1 - first)
    return "\n".join(lines)


def out_of_line_tests(path):
    """The files of the out-of-line test modules `path` declares."""
    text = path.read_text()
    base = path.parent if path.name in ("lib.rs", "main.rs", "mod.rs") else path.with_suffix("")
    for _, _, name, inline in test_modules(text):
        if not inline:
            yield base / f"{name}.rs"
            yield base / name / "mod.rs"


def functions(path):
    lines = blank_inline_tests(path.read_text()).split("\n")
    for i, line in enumerate(lines):
        m = FN.match(line)
        if not m:
            continue
        depth, started, j = 0, False, i
        while j < len(lines):
            s = strip_line(lines[j])
            for ch in s:
                if ch == "{":
                    depth += 1
                    started = True
                elif ch == "}":
                    depth -= 1
            if started and depth <= 0:
                break
            if not started and s.rstrip().endswith(";"):
                break
            j += 1
        yield m.group(7), i + 1, j - i + 1


def long_functions(path):
    """The functions in `path` over the limit: (name, line, length)."""
    return [(name, line, n) for name, line, n in functions(path) if n > LIMIT]


def files(entry):
    return rust_files(ROOT / entry)


def rust_files(p):
    """`p` itself, or every .rs file under it but bin/ targets and test modules' files."""
    if p.is_file():
        return [p]
    found = sorted(f for f in p.rglob("*.rs") if "bin" not in f.relative_to(p).parts[:1])
    tests = {t for f in found for t in out_of_line_tests(f)}
    return [f for f in found if f not in tests]


def self_test():
    """The check on a made-up crate: what it must count and what it must not. Returns the
    failures."""
    def fn(name, lines):
        return [f"fn {name}() {{"] + ["    x();"] * (lines - 2) + ["}"]

    lib = "\n".join(
        fn("long", 81) + fn("at_limit", 80)
        + ["#[cfg(test)]", "#[allow(", "    clippy::indexing_slicing,", ")]", "mod tests {"]
        + ["    " + line for line in fn("inline_test", 90)] + ["}"]
        + fn("after_tests", 82)
        + ["#[cfg(test)]", "#[allow(clippy::indexing_slicing)]", "mod checks;", "mod wire;"]
    )
    wire = "\n".join(fn("decode", 85) + ["#[cfg(test)]", "mod tests;"])
    test_file = "\n".join(fn("out_of_line_test", 95))
    failures = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        (src / "wire").mkdir(parents=True)
        (src / "lib.rs").write_text(lib)
        (src / "wire.rs").write_text(wire)
        (src / "checks.rs").write_text(test_file)
        (src / "wire" / "tests.rs").write_text(test_file)
        found = rust_files(src)
        if sorted(f.name for f in found) != ["lib.rs", "wire.rs"]:
            failures.append(f"files: {[f.name for f in found]}, not lib.rs and wire.rs")
        long = sorted((name, n) for f in found for name, _, n in long_functions(f))
        want = [("after_tests", 82), ("decode", 85), ("long", 81)]
        if long != want:
            failures.append(f"over the limit: {long}, not {want}")
    return failures


def main():
    failures = self_test()
    for failure in failures:
        print(f"check-function-length: self-test: {failure}", file=sys.stderr)
    if failures:
        return 2
    long = []
    for entry in PATH:
        found = files(entry)
        if not found:
            print(f"check-function-length: {entry} is gone; update PATH", file=sys.stderr)
            return 1
        for f in found:
            for name, line, n in long_functions(f):
                long.append((n, f.relative_to(ROOT), line, name))
    for n, f, line, name in sorted(long, reverse=True):
        print(f"{f}:{line}: fn {name} is {n} lines (limit {LIMIT})")
    if long:
        return 1
    print(f"no function over {LIMIT} lines on the transaction path ({len(PATH)} entries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
