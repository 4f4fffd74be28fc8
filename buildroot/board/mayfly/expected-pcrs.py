#!/usr/bin/env python3
"""Expected PCR 8 and PCR 9 values of the Mayfly boot chain, computed by replaying what GRUB
2.06's tpm module measures while it runs grub.cfg (docs/formats.md, "Expected PCRs").

GRUB 2.06 (grub-core/commands/tpm.c, the "tpm" verifier) extends, through the firmware's
EFI_TCG2_PROTOCOL, in the SHA-256 bank:
  PCR 9  SHA-256 of each file it reads whole (grub.cfg, the multiboot2 kernel, each module2
         file), unless opened with --skip-sig (grubenv's load_env);
  PCR 8  SHA-256 of each command line it executes, after variable expansion, as the words
         joined by one space (event text "grub_cmd: ..."); of each multiboot2 kernel's and
         module2 module's command line, the words after the file name joined by one space
         ("kernel_cmdline: ...", "module_cmdline: ..."; an empty string for a module
         without arguments). `if`, `elif`, `else` and `fi` are not commands; the conditions
         inside them are. A menuentry definition is a command whose last word is its block,
         "{" + the block's source text as written (from after "{" to before "}") + "}"
         (blocks with "*", "?" or a backslash, which GRUB escapes, are refused); booting an
         entry runs
         "setparams <title>" before the entry's commands.
A PCR starts at 32 zero bytes and each event sets it to SHA-256(PCR || digest).

The replay understands the subset of GRUB's script language grub.cfg uses: set, load_env,
save_env, [ (=, !=, -n, -z, -o, -a), if/elif/else/fi, menuentry blocks with --id, and no-op
terminal commands; anything else is an error, so a changed grub.cfg cannot silently produce
wrong values. The replay is run for every A/B state grubenv can hold (mayfly_slot a|b,
mayfly_try none|a|b, mayfly_tries 0..3); the file loaded as /xen-<slot>, /vmlinux-<slot>
is this image's (whichever slot holds it).

Usage: expected-pcrs.py GRUB_CFG --file /xen-a=XEN --file /xen-b=XEN ...
       (writes the file to stdout)
       expected-pcrs.py --check-vector GRUB_CFG EVENTS
       (replays GRUB_CFG in state slot a, no trial, and compares the SHA-256 of each PCR 8
       event with EVENTS, one hex digest a line, as recorded from a real GRUB 2.06 boot:
       docs/vectors/grub-2.06-*)
"""
import argparse
import hashlib
import re
import sys


class ReplayError(Exception):
    pass


def extend(pcr, digest):
    return hashlib.sha256(pcr + digest).digest()


def words(line, env):
    """GRUB's word splitting with $name / ${name} expansion and quotes (no globbing)."""
    out = []
    i, n = 0, len(line)
    while i < n:
        while i < n and line[i] in " \t":
            i += 1
        if i >= n:
            break
        word, quoted = "", False
        while i < n and line[i] not in " \t":
            c = line[i]
            if c == '"':
                quoted = True
                j = line.index('"', i + 1)
                word += expand(line[i + 1:j], env)
                i = j + 1
            elif c == "'":
                quoted = True
                j = line.index("'", i + 1)
                word += line[i + 1:j]
                i = j + 1
            elif c == ";":
                break
            else:
                m = re.match(r"\$\{(\w+)\}|\$(\w+)", line[i:])
                if m:
                    word += env.get(m.group(1) or m.group(2), "")
                    i += m.end()
                else:
                    word += c
                    i += 1
        if word or quoted:
            out.append(word)
        if i < n and line[i] == ";":
            out.append(";")
            i += 1
    return out


def expand(text, env):
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: env.get(m.group(1) or m.group(2), ""), text)


def test(args):
    """GRUB's [ ... ] for the operators grub.cfg uses."""
    if not args or args[-1] != "]":
        raise ReplayError("[ without ]")
    args = args[:-1]
    # -o binds loosest, then -a.
    for op in ("-o", "-a"):
        if op in args:
            k = args.index(op)
            left, right = test(args[:k] + ["]"]), test(args[k + 1:] + ["]"])
            return (left or right) if op == "-o" else (left and right)
    if len(args) == 3 and args[1] in ("=", "==", "!="):
        return (args[0] == args[2]) == (args[1] != "!=")
    if len(args) == 2 and args[0] in ("-n", "-z"):
        return (args[1] != "") == (args[0] == "-n")
    raise ReplayError("unsupported test: " + " ".join(args))


class Replay:
    def __init__(self, files, grubenv):
        self.files = files
        self.grubenv = grubenv
        self.env = {}
        self.pcr8 = bytes(32)
        self.pcr9 = bytes(32)
        self.entries = {}
        self.events = []

    def measure_string(self, kind, text):
        self.pcr8 = extend(self.pcr8, hashlib.sha256(text.encode()).digest())
        self.events.append((8, kind + ": " + text))

    def measure_file(self, path):
        if self.files is None:  # --check-vector: PCR 8 only
            self.events.append((9, path))
            return
        if path not in self.files:
            raise ReplayError("grub.cfg loads %s, which was not given (--file)" % path)
        self.pcr9 = extend(self.pcr9, hashlib.sha256(self.files[path]).digest())
        self.events.append((9, path))

    def command(self, argv):
        """Runs one command; returns its status (True = success)."""
        self.measure_string("grub_cmd", " ".join(argv))
        name, args = argv[0], argv[1:]
        if name == "set":
            for a in args:
                k, _, v = a.partition("=")
                self.env[k] = v
            return True
        if name == "load_env":
            names = [a for a in args if not a.startswith("-")]
            if "--skip-sig" not in args:
                raise ReplayError("load_env without --skip-sig would measure grubenv")
            for k in names:
                if k in self.grubenv:
                    self.env[k] = self.grubenv[k]
            return True
        if name == "save_env":
            for k in args:
                self.grubenv[k] = self.env.get(k, "")
            return True
        if name == "[":
            return test(args)
        if name in ("serial", "terminal_input", "terminal_output"):
            return True
        if name in ("multiboot2", "module2"):
            self.measure_file(args[0])
            kind = "kernel_cmdline" if name == "multiboot2" else "module_cmdline"
            self.measure_string(kind, " ".join(args[1:]))
            return True
        raise ReplayError("command %r is not understood by the replay" % name)

    def run(self, lines, blocks=None):
        """Runs a list of (already stripped, comment-free) lines; `blocks` maps a menu
        entry's id to its block's source text."""
        i = 0
        # Stack of [taken: a branch already ran, active: this branch runs, outer_active].
        stack = []
        active = True
        while i < len(lines):
            line = lines[i]
            i += 1
            head = line.split(None, 1)[0]
            if head == "menuentry":
                body = []
                while lines[i] != "}":
                    body.append(lines[i])
                    i += 1
                i += 1
                if active:
                    m = re.search(r"--id\s+(\S+)", line)
                    if not m or blocks is None or m.group(1) not in blocks:
                        raise ReplayError("menuentry without --id, or not at the top level")
                    head = words(line[: line.rindex("{")], self.env)
                    raw = blocks[m.group(1)]
                    if re.search(r"[*?\\]", raw):
                        # GRUB escapes these in the measured text; not checked against a
                        # real TPM, so refused rather than guessed.
                        raise ReplayError("a menu entry's block has '*', '?' or a backslash")
                    self.measure_string("grub_cmd", " ".join(head + ["{" + raw + "}"]))
                    self.entries[m.group(1)] = (head[1], body)
                continue
            if head in ("if", "elif"):
                cond = line[len(head):].strip()
                if not cond.endswith("; then"):
                    raise ReplayError("expected 'if CMD; then' on one line: " + line)
                cond = cond[: -len("; then")]
                if head == "if":
                    stack.append([False, False, active])
                frame = stack[-1]
                if frame[2] and not frame[0]:
                    ok = self.command(words(cond, self.env))
                    frame[0] = frame[1] = ok
                else:
                    frame[1] = False
                active = frame[1] and frame[2]
                continue
            if head == "else":
                frame = stack[-1]
                frame[1] = frame[2] and not frame[0]
                frame[0] = True
                active = frame[1]
                continue
            if head == "fi":
                active = stack.pop()[2]
                continue
            if active:
                self.command(words(line, self.env))
        if stack:
            raise ReplayError("if without fi")

    def boot(self, cfg_text):
        self.measure_file("/EFI/BOOT/grub.cfg")
        # Each menu entry's block as written: from after the "{" ending its menuentry line
        # to before the "}" alone on a line.
        blocks = {
            m.group(1): m.group(2)
            for m in re.finditer(r"^\s*menuentry [^\n]*--id\s+(\S+)[^\n]*\{(.*?)^\}",
                                 cfg_text, re.S | re.M)
        }
        lines = [line.strip() for line in cfg_text.splitlines()]
        lines = [line for line in lines if line and not line.startswith("#")]
        self.run(lines, blocks)
        entry = self.env.get("default", "0")
        if entry not in self.entries:
            raise ReplayError("default entry %r is no menuentry --id" % entry)
        title, body = self.entries[entry]
        self.measure_string("grub_cmd", "setparams " + title)
        self.run(body)
        return entry


STATES = [(slot, trial, tries) for slot in "ab" for trial in ("", "a", "b")
          for tries in (range(4) if trial else [0])]


def compute(cfg_bytes, files):
    files = dict(files)
    files["/EFI/BOOT/grub.cfg"] = cfg_bytes
    out = []
    for slot, trial, tries in STATES:
        grubenv = {"mayfly_slot": slot, "mayfly_try": trial, "mayfly_tries": str(tries)}
        r = Replay(files, grubenv)
        entry = r.boot(cfg_bytes.decode())
        out.append((slot, trial, tries, entry, r.pcr8, r.pcr9, r))
    return out


def check_vector(cfg_path, events_path):
    """Exit status 0 when the replay's PCR 8 events are the recorded ones."""
    want = open(events_path).read().split()
    r = Replay(None, {"mayfly_slot": "a", "mayfly_try": "", "mayfly_tries": "0"})
    r.boot(open(cfg_path).read())
    have = [(hashlib.sha256(t.split(": ", 1)[1].encode()).hexdigest(), t)
            for pcr, t in r.events if pcr == 8]
    for i, (d, t) in enumerate(have):
        if i >= len(want) or want[i] != d:
            print("expected-pcrs.py: PCR 8 event %d (%s) is not the recorded one" % (i, t),
                  file=sys.stderr)
            return 1
    if len(have) != len(want):
        print("expected-pcrs.py: %d events replayed, %d recorded" % (len(have), len(want)),
              file=sys.stderr)
        return 1
    print("expected-pcrs.py: the %d PCR 8 events of the recorded GRUB 2.06 boot replayed" % len(have))
    return 0


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--check-vector":
        return check_vector(sys.argv[2], sys.argv[3])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("grub_cfg")
    ap.add_argument("--file", action="append", default=[], metavar="GRUBPATH=FILE",
                    help="a file grub.cfg loads, e.g. /xen-a=images/xen")
    ap.add_argument("--events", action="store_true", help="also print the replayed events")
    a = ap.parse_args()
    cfg = open(a.grub_cfg, "rb").read()
    files = {}
    for spec in a.file:
        path, _, local = spec.partition("=")
        files[path] = open(local, "rb").read()
    try:
        rows = compute(cfg, files)
    except (ReplayError, ValueError) as e:
        print("expected-pcrs.py: %s" % e, file=sys.stderr)
        return 1
    print("mayfly-expected-pcrs 1")
    print("bank sha256")
    print("grub-cfg %s" % hashlib.sha256(cfg).hexdigest())
    for path in sorted(files):
        print("file %s %s" % (path, hashlib.sha256(files[path]).hexdigest()))
    for slot, trial, tries, entry, p8, p9, r in rows:
        print("state slot=%s try=%s tries=%d entry=%s pcr8=%s pcr9=%s"
              % (slot, trial or "-", tries, entry, p8.hex(), p9.hex()))
        if a.events:
            for pcr, text in r.events:
                print("#   pcr%d %s" % (pcr, text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
