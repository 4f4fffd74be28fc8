#!/usr/bin/env python3
"""No import circle inside any crate (issue 20): for every crate of the workspace, the
top-level modules of its src/ and the uses between them (`crate::m`, `super::m` from a
file directly under src/, and in the crate root `m::` paths other than `mod` declarations
and `pub use` re-exports; a `crate::Item` re-exported by the root counts as a use of the
module that defines it, as does a `#[macro_export]` macro). `use crate::{a, b::c}` groups count as uses of each item's module. Test modules
(`#[cfg(test)]` to the end of a file) do not count.
Prints each circle; exits 1 on any circle not within KNOWN (empty since issue 20)."""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IDENT = r"[A-Za-z_][A-Za-z0-9_]*"

# Circles tolerated, per crate directory (a circle within one of these is reported as known;
# any other fails). The ledger's, the API's and the policy's, left when issue 20 was worked,
# are gone: none is tolerated now. Keep it that way.
KNOWN = {}


def strip(text):
    text = re.sub(r"//[^\n]*", "", text)
    m = re.search(r"#\[cfg\(test\)\]\s*(pub(\(crate\))?\s+)?mod\s+\w+\s*\{", text)
    return text[: m.start()] if m else text


def brace_heads(group):
    """The first path segment of each item of a `use crate::{...}` group (nested groups
    included: `a::{b, c}` gives `a`)."""
    heads, depth, item = [], 0, ""
    for ch in group + ",":
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            m = re.match(r"\s*(" + IDENT + ")", item)
            if m and m.group(1) != "self":
                heads.append(m.group(1))
            item = ""
        else:
            item += ch
    return heads


def top_module(src, path):
    rel = path.relative_to(src).parts
    if len(rel) == 1:
        stem = path.stem
        return None if stem in ("lib", "main") else stem
    return rel[0]


def crate_graph(src):
    files = [p for p in src.rglob("*.rs") if "bin" not in p.relative_to(src).parts[:1]]
    mods = {top_module(src, p) for p in files} - {None}
    root = src / "lib.rs" if (src / "lib.rs").exists() else src / "main.rs"
    if not root.exists():
        return {}
    reexports = {}
    root_text = strip(root.read_text())
    for m in re.finditer(r"pub(?:\([^)]*\))?\s+use\s+(?:self::)?(" + IDENT + r")::([^;]+);", root_text):
        if m.group(1) in mods:
            for name in re.findall(IDENT, m.group(2)):
                reexports.setdefault(name, m.group(1))
    # A `#[macro_export]` macro is reached as `crate::name!` although the module that defines
    # it is what is used.
    for p in files:
        me = top_module(src, p)
        if me is None:
            continue
        for name in re.findall(r"#\[macro_export\]\s*macro_rules!\s*(" + IDENT + ")", strip(p.read_text())):
            reexports.setdefault(name, me)
    edges = {m: set() for m in mods | {"<root>"}}
    for p in files:
        me = top_module(src, p) or "<root>"
        if p.parent == src and p.stem in ("lib", "main") and p != root:
            continue
        text = strip(p.read_text())
        targets = set(re.findall(r"\bcrate::(" + IDENT + ")", text))
        for group in re.findall(r"\bcrate::\{([^;]*)\};", text):
            targets |= set(brace_heads(group))
        if p.parent == src and me != "<root>":
            targets |= set(re.findall(r"\bsuper::(" + IDENT + ")", text))
        if me == "<root>":
            body = "\n".join(
                line for line in text.split("\n")
                if not re.match(r"\s*(pub(\([^)]*\))?\s+)?(mod|use)\s", line)
                or re.match(r"\s*use\s", line)
            )
            targets |= {t for t in re.findall(r"(?<![:\w])(" + IDENT + r")::", body) if t in mods}
        for t in targets:
            dest = t if t in mods else reexports.get(t, "<root>")
            if dest != me:
                edges[me].add(dest)
    return edges


def circles(edges):
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(edges):
        if v not in index:
            visit(v)
    return out


def main():
    bad = 0
    for manifest in sorted(ROOT.glob("**/Cargo.toml")):
        if "target" in manifest.parts or manifest.parent == ROOT:
            continue
        src = manifest.parent / "src"
        if not src.is_dir():
            continue
        name = str(manifest.parent.relative_to(ROOT))
        for comp in circles(crate_graph(src)):
            if set(comp) <= KNOWN.get(name, set()):
                print(f"known circle in {name}: {' <-> '.join(comp)}")
                continue
            bad += 1
            print(f"circle in {name}: {' <-> '.join(comp)}")
    if bad:
        sys.exit(1)
    print("no new import circle inside any crate")


if __name__ == "__main__":
    main()
