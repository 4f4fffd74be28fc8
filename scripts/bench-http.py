#!/usr/bin/env python3
"""End-to-end benchmark of the client API over HTTP, with wrk (issue 15).

Measures, in one run and interleaved, with medians of BENCH_REPS repetitions:

* executor-direct: `cargo bench -p dom0-agent --bench transactions` in its BENCH_ONLY=sandbox
  mode (transfers through the executor, no HTTP), at 1 and 8 clients, measured once its pool
  of 16 is full (BENCH_WARM_POOL=16): the baseline;
* HTTP: `dom0-agent serve` (release, sandbox backend, pool 16, warm) driven by wrk with keep-alive, transfers
  between random accounts among 1,000, at 1 and 8 connections, plain and TLS;
* the CPU per transaction of every party, over the measured window: the agent's, split by
  thread into its "api" threads (tokio's network workers and the blocking pool transactions
  run on) and its other threads (ledger commit, sandbox), plus its zygote tree (the zygote
  and its reaped clones), from /proc; the same split of the executor-direct bench (its
  client threads, each calling the executor, take the api threads' place; RUSAGE_THREAD);
  both sides' context switches per transaction; and wrk's own CPU per request (wait4's
  rusage). From these: the HTTP layer's CPU per transaction (the agent and its tree minus
  executor-direct's) and its share of the agent's - the figure the target is about, as the
  throughput ratio mixes in wrk's CPU on the same two cores;
* a normal client's latency (wrk, 1 connection) unloaded, beside 1,000 idle keep-alive
  connections, and beside 1,000 connections trickling a header byte each per second.

Needs wrk (Debian: `apt-get install wrk`) and openssl (the TLS run's certificate). The rate
rules of the shipped policy (2,000 transactions and 1,000 transfers a second per client) are
raised for the run: every wrk connection comes from 127.0.0.1, one client; the executor
bench gives each thread its own client name instead.

    cargo build --release -p dom0-agent -p domu-shim
    python3 scripts/bench-http.py            # BENCH_SECS=8 BENCH_REPS=3 by default

BENCH_PIN=1 pins wrk to CPU 0 and the agent (its zygote and clones inherit the mask) and the
executor-direct bench to CPU 1; BENCH_LOAD=0 skips the 1,000-connection runs;
BENCH_AGENT=<binary> and BENCH_AGENT_ARGS="<serve flags>" select what is measured (A/B).
"""
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
AGENT = pathlib.Path(os.environ.get("BENCH_AGENT", ROOT / "target" / "release" / "dom0-agent"))
# More `dom0-agent serve` flags for every agent of the run (`--workers 1`, say).
AGENT_EXTRA = os.environ.get("BENCH_AGENT_ARGS", "").split()
SECS = int(os.environ.get("BENCH_SECS", "8"))
REPS = int(os.environ.get("BENCH_REPS", "3"))
ACCOUNTS = 1000
TICK = os.sysconf("SC_CLK_TCK")
# BENCH_PIN=1: the load generator on CPU 0, the agent (and its zygote and clones, which
# inherit the mask) on CPU 1, the executor-direct bench on CPU 1 too: the executor side has
# one core to itself in both, and the load generator's CPU no longer competes with it.
PIN = os.environ.get("BENCH_PIN") == "1"
EXEC_CPU, LOAD_CPU = ["taskset", "-c", "1"], ["taskset", "-c", "0"]
# BENCH_LOAD=0 skips the 1,000-connection runs (for A/B runs of the transaction path).
LOAD_RUNS = os.environ.get("BENCH_LOAD", "1") != "0"


def proc_stat(path):
    """(comm, utime+stime+cutime+cstime seconds) of a /proc/<pid>/stat."""
    with open(path) as f:
        head, rest = f.read().rsplit(")", 1)
    fields = rest.split()
    # utime, stime, cutime, cstime are fields 14..17 (1-based) of the whole line.
    return head.split("(", 1)[1], sum(int(x) for x in fields[11:15]) / TICK


def task_cpu(path):
    """(comm, utime+stime seconds) of one thread's /proc/<pid>/task/<tid>/stat."""
    with open(path) as f:
        head, rest = f.read().rsplit(")", 1)
    fields = rest.split()
    return head.split("(", 1)[1], (int(fields[11]) + int(fields[12])) / TICK

LUA = """
math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
request = function()
  local a = math.random(0, %d)
  local b = math.random(0, %d)
  if a == b then b = (a + 1) %% %d end
  local body = '{"handler":"transfer","payload":{"from":"acct' .. a .. '","to":"acct' .. b .. '","amount":1}}'
  return wrk.format(nil, "/v1/transactions", nil, body)
end
done = function(summary, latency, requests)
  io.write(string.format("MAYFLY %%d %%d %%d %%d %%d\\n", summary.requests,
    summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
""" % (ACCOUNTS - 1, ACCOUNTS - 1, ACCOUNTS)


def policy_dir(tmp):
    """The shipped bundle with its per-client rates raised out of the way."""
    d = tmp / "policy"
    shutil.copytree(ROOT / "policies" / "default", d)
    det = d / "detection.toml"
    text = det.read_text()
    text = re.sub(r"max = [0-9_]+\nwindow_ms", "max = 1_000_000\nwindow_ms", text)
    det.write_text(text)
    return d


def cert(tmp):
    key, crt = tmp / "api.key", tmp / "api.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(key), "-out", str(crt), "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True)
    return crt, key


class Agent:
    def __init__(self, tmp, name, extra):
        self.dir = tmp / name
        args = (EXEC_CPU if PIN else []) + [str(AGENT), "serve", "--listen", "127.0.0.1:0", "--data-dir", str(self.dir),
                "--policy", str(policy_dir_path), "--pool-size", "16"] + extra
        args += AGENT_EXTRA
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True)
        for line in self.proc.stdout:
            m = re.match(r"mayfly: serving on (https?)://(\S+)", line)
            if m:
                self.url = f"{m.group(1)}://{m.group(2)}"
                host, port = m.group(2).rsplit(":", 1)
                self.addr = (host, int(port))
                break
        else:
            raise SystemExit("agent did not start")
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def cpu(self):
        """CPU seconds so far: the agent process, split by thread into its HTTP threads
        ("api": tokio's network workers and the blocking pool the transactions run on, the
        counterpart of executor-direct's client threads) and the rest (the ledger's commit
        thread, the sandbox's threads), and the zygote tree (the zygote and its reaped
        clones)."""
        # The process's own time counts threads that have ended (an idle blocking-pool
        # thread); the named threads live as long as the agent, so "api" is the remainder.
        total = task_cpu(f"/proc/{self.proc.pid}/stat")[1]
        other, switches = 0.0, 0
        for task in pathlib.Path(f"/proc/{self.proc.pid}/task").iterdir():
            try:
                name, t = task_cpu(task / "stat")
                status = (task / "status").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue  # a thread that ended: its time is in neither reading
            if not name.startswith("api"):  # "api", and "api-tls" (TLS handshakes)
                other += t
            # Context switches (voluntary and not) of the agent's live threads: every
            # hand-off between threads costs one or two.
            switches += sum(int(line.split()[1]) for line in status.splitlines()
                            if "ctxt_switches:" in line)
        tree = 0.0
        for child in pathlib.Path(f"/proc/{self.proc.pid}/task").glob("*/children"):
            for pid in child.read_text().split():
                try:
                    tree += proc_stat(f"/proc/{pid}/stat")[1]
                except FileNotFoundError:
                    pass
        return {"api": total - other, "other": other, "tree": tree, "switches": switches}

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def seed(addr, tls):
    """Opens the accounts over one plain keep-alive connection (TLS: through openssl s_client
    is slow, so seeding runs on a plain agent first for TLS too - see run_http)."""
    s = socket.create_connection(addr)
    buf = b""
    for i in range(ACCOUNTS):
        body = json.dumps({"handler": "open_account",
                           "payload": {"name": f"acct{i}", "balance": 1_000_000_000}}).encode()
        s.sendall(b"POST /v1/transactions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        while b"\r\n\r\n" not in buf:
            buf += s.recv(65536)
        head, rest = buf.split(b"\r\n\r\n", 1)
        n = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))
        while len(rest) < n:
            rest += s.recv(65536)
        assert head.split()[1] == b"200", head
        buf = rest[n:]
    s.close()


def wrk(url, conns, secs, lua):
    """One wrk run; its own CPU (user + system, all its threads) from wait4's rusage."""
    proc = subprocess.Popen(
        (LOAD_CPU if PIN else []) +
        ["wrk", "-t", str(min(conns, 2)), "-c", str(conns), "-d", f"{secs}s", "-s", str(lua),
         "--timeout", "10s", url],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out_chunks = []
    reader = threading.Thread(target=lambda: out_chunks.append(proc.stdout.read()))
    reader.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    out = out_chunks[0]
    if proc.returncode != 0:
        raise SystemExit(f"wrk failed ({proc.returncode}): {out}")
    m = re.search(r"MAYFLY (\d+) (\d+) (\d+) (\d+) (\d+)", out)
    reqs, bad_status, errors, p50, p99 = map(int, m.groups())
    return {"rate": reqs / secs, "requests": reqs, "non2xx": bad_status, "errors": errors,
            "p50_ms": p50 / 1000, "p99_ms": p99 / 1000,
            "wrk_cpu_us": (usage.ru_utime + usage.ru_stime) / max(reqs, 1) * 1e6}


def run_http(tmp, lua, tls, conns, rep, extra=(), load=None):
    name = f"{'tls' if tls else 'plain'}-{conns}-{rep}-{load or 'none'}"
    data_extra = list(extra)
    if tls:
        data_extra += ["--tls-cert", str(crt), "--tls-key", str(key)]
    # Seed the accounts over plain HTTP, then restart the same ledger with TLS if asked.
    a = Agent(tmp, name, list(extra))
    seed(a.addr, False)
    if tls:
        a.stop()
        a = Agent(tmp, name, data_extra)
    holder = None
    if load:
        holder = Load(a.addr, load)
        holder.start()
    c0 = a.cpu()
    r = wrk(a.url, conns, SECS, lua)
    c1 = a.cpu()
    if holder:
        r["load_open"] = holder.stop()
    a.stop()
    done = max(r["requests"], 1)
    for part in ("api", "other", "tree"):
        r[f"{part}_us"] = (c1[part] - c0[part]) / done * 1e6
    r["switches"] = (c1["switches"] - c0["switches"]) / done
    r["agent_cpu_us"] = r["api_us"] + r["other_us"]
    r["tree_cpu_us"] = r["agent_cpu_us"] + r["tree_us"]
    shutil.rmtree(tmp / name, ignore_errors=True)
    return r


class Load:
    """1,000 connections beside the measured client: idle (keep-alive, nothing sent after
    one request) or trickling a header byte each per second."""

    def __init__(self, addr, kind):
        self.addr, self.kind, self.socks, self.running = addr, kind, [], True

    def start(self):
        for _ in range(1000):
            s = socket.create_connection(self.addr)
            if self.kind == "idle":
                s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
                s.recv(65536)
            else:
                s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
            s.setblocking(False)
            self.socks.append(s)
        self.thread = threading.Thread(target=self.trickle, daemon=True)
        self.thread.start()

    def trickle(self):
        while self.running:
            if self.kind == "trickle":
                for s in self.socks:
                    try:
                        s.send(b"X")
                    except OSError:
                        pass
            time.sleep(1)

    def stop(self):
        self.running = False
        self.thread.join()
        open_now = 0
        for s in self.socks:
            try:
                open_now += s.recv(1) != b""
            except BlockingIOError:
                open_now += 1
            except OSError:
                pass
            s.close()
        return open_now


def executor_direct(clients):
    env = dict(os.environ, BENCH_ONLY="sandbox", BENCH_CLIENTS=str(clients), BENCH_SECS=str(SECS),
               BENCH_WARM_POOL="16")
    out = subprocess.run(
        (EXEC_CPU if PIN else []) +
        ["cargo", "bench", "--quiet", "-p", "dom0-agent", "--bench", "transactions", "--", "--bench"],
        cwd=ROOT, env=env, check=True, capture_output=True, text=True).stdout
    m = re.search(r"sandbox: (\d+) tx/s p50 ([\d.]+)(µs|ms|s) p99 ([\d.]+)(µs|ms|s) cpu/tx (\d+) µs "
                  r"\(measured window: clients (\d+) µs, other threads (\d+) µs, zygote tree (\d+) µs, "
                  r"([\d.]+) context switches/tx\)",
                  out)
    unit = {"µs": 1e-3, "ms": 1.0, "s": 1e3}
    api, other, tree = (float(m.group(i)) for i in (7, 8, 9))
    return {"rate": float(m.group(1)), "p50_ms": float(m.group(2)) * unit[m.group(3)],
            "p99_ms": float(m.group(4)) * unit[m.group(5)], "bench_cpu_us": float(m.group(6)),
            "api_us": api, "other_us": other, "tree_us": tree, "switches": float(m.group(10)),
            "agent_cpu_us": api + other, "tree_cpu_us": api + other + tree}


def med(rows, key):
    return statistics.median(r[key] for r in rows)


if __name__ == "__main__":
    if not AGENT.exists():
        sys.exit(f"{AGENT} missing: cargo build --release -p dom0-agent -p domu-shim")
    if not shutil.which("wrk"):
        sys.exit("wrk missing: apt-get install wrk")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="mayfly-httpbench-"))
    policy_dir_path = policy_dir(tmp)
    crt, key = cert(tmp)
    lua = tmp / "transfer.lua"
    lua.write_text(LUA)
    print(f"HTTP bench: {SECS} s per run, {REPS} interleaved repetitions, medians"
          f"{'; wrk pinned to CPU 0, agent and executor-direct bench to CPU 1' if PIN else ''};"
          f" load average {os.getloadavg()[0]:.2f}", flush=True)
    results = {}
    long = ["--header-timeout-ms", "600000", "--idle-timeout-ms", "600000"]
    for rep in range(REPS):
        for conns in (1, 8):
            results.setdefault(("direct", conns), []).append(executor_direct(conns))
            for tls in (False, True):
                results.setdefault((tls, conns), []).append(run_http(tmp, lua, tls, conns, rep))
        for load in (None, "idle", "trickle") if LOAD_RUNS else ():
            results.setdefault(("load", load), []).append(
                run_http(tmp, lua, False, 1, rep, extra=long, load=load))
        print(f"repetition {rep + 1} done (load average {os.getloadavg()[0]:.2f})", flush=True)
    for conns in (1, 8):
        d = results[("direct", conns)]
        dr, dc = med(d, "rate"), med(d, "tree_cpu_us")
        print(f"{conns} connection(s):")
        print(f"  executor-direct: {dr:8.0f} tx/s  p50 {med(d, 'p50_ms'):6.2f} ms  p99 {med(d, 'p99_ms'):6.2f} ms"
              f"  cpu/tx {dc:5.0f} µs = clients {med(d, 'api_us'):4.0f} + other threads {med(d, 'other_us'):4.0f}"
              f" + zygote tree {med(d, 'tree_us'):4.0f}; {med(d, 'switches'):4.1f} context switches/tx"
              f" (bench's whole-run cpu/tx {med(d, 'bench_cpu_us'):5.0f})")
        for tls in (False, True):
            h = results[(tls, conns)]
            hr, hc = med(h, "rate"), med(h, "tree_cpu_us")
            print(f"  {'https' if tls else 'http ':>5} wrk      : {hr:8.0f} tx/s  p50 {med(h, 'p50_ms'):6.2f} ms  p99 {med(h, 'p99_ms'):6.2f} ms"
                  f"  cpu/tx {hc:5.0f} µs = api threads {med(h, 'api_us'):4.0f} + other threads {med(h, 'other_us'):4.0f}"
                  f" + zygote tree {med(h, 'tree_us'):4.0f}; {med(h, 'switches'):4.1f} context switches/tx;"
                  f" wrk {med(h, 'wrk_cpu_us'):4.0f} µs/request"
                  f"  non-2xx {sum(r['non2xx'] for r in h)}  errors {sum(r['errors'] for r in h)}")
            # The HTTP layer's CPU: the agent's (with its zygote tree) over executor-direct's
            # (with its client threads and zygote tree), per transaction, from each run's
            # medians; as a share of the throughput a CPU-bound executor side would lose.
            extra_us = hc - dc
            print(f"          -> throughput {hr / dr:.2f}x executor-direct ({(1 - hr / dr) * 100:+.1f} % cost);"
                  f" HTTP layer CPU {extra_us:+.0f} µs/tx = {extra_us / hc * 100:+.1f} % of the agent's"
                  f" (api threads {med(h, 'api_us') - med(d, 'api_us'):+.0f} µs over the clients')")
    if not LOAD_RUNS:
        shutil.rmtree(tmp, ignore_errors=True)
        sys.exit(0)
    base = results[("load", None)]
    print("normal client (1 connection) beside 1,000 connections:")
    for load in (None, "idle", "trickle"):
        h = results[("load", load)]
        extra = "" if load is None else f"  ({statistics.median(r['load_open'] for r in h):.0f} of 1000 still open at the end)"
        print(f"  {load or 'unloaded':>8}: {med(h, 'rate'):7.0f} tx/s  p50 {med(h, 'p50_ms'):6.2f} ms  p99 {med(h, 'p99_ms'):6.2f} ms  p99 ratio {med(h, 'p99_ms') / med(base, 'p99_ms'):.2f}x{extra}")
    shutil.rmtree(tmp, ignore_errors=True)
