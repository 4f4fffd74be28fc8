#!/usr/bin/env python3
"""No function over 80 lines on the transaction path (issue 20): every function in the
files a transaction passes through, from the client API's network edge to the ledger's
commit and the domain that runs it. A function's length is counted from its `fn` line to
its closing brace, comments and blank lines included; test modules (`#[cfg(test)]` to the
end of a file) do not count. Prints each function over the limit; exits 1 if any."""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMIT = 80

# The transaction path, in the order a request meets it. A directory means every .rs file
# under it (bin/ targets excluded).
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

FN = re.compile(
    r'^\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?(extern\s+"C"\s+)?fn\s+(\w+)'
)


def strip_line(line):
    line = re.sub(r'"(\\.|[^"\\])*"', '""', line)
    line = re.sub(r"'(\\.|[^'\\])'", "''", line)
    return re.sub(r"//.*", "", line)


def functions(path):
    text = path.read_text()
    m = re.search(r"#\[cfg\(test\)\]\s*(pub(\(crate\))?\s+)?mod\s+\w+\s*\{", text)
    if m:
        text = text[: m.start()]
    lines = text.split("\n")
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


def files(entry):
    p = ROOT / entry
    if p.is_file():
        return [p]
    return sorted(f for f in p.rglob("*.rs") if "bin" not in f.relative_to(p).parts[:1])


def main():
    long = []
    for entry in PATH:
        found = files(entry)
        if not found:
            print(f"check-function-length: {entry} is gone; update PATH", file=sys.stderr)
            return 1
        for f in found:
            for name, line, n in functions(f):
                if n > LIMIT:
                    long.append((n, f.relative_to(ROOT), line, name))
    for n, f, line, name in sorted(long, reverse=True):
        print(f"{f}:{line}: fn {name} is {n} lines (limit {LIMIT})")
    if long:
        return 1
    print(f"no function over {LIMIT} lines on the transaction path ({len(PATH)} entries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
