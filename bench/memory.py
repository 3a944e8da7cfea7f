#!/usr/bin/env python3
"""Does memory come back after load (issue 11)? The release `burrow-edge` and `burrow-agent` as
processes on loopback, one open tunnel to a local HTTP service, then ROUNDS rounds of: wrk
keep-alive (-t2 -c64, 6 s), wrk with `Connection: close` (-t2 -c16, 6 s), 20 s idle. Prints
VmRSS and open fds of both processes at baseline, after each round's load and after each idle,
and every wrk run's requests a second. Repeating a round should not raise either RSS.

    cargo build --release -p burrow-quickstart -p burrow-agent
    python3 bench/memory.py [BIN_DIR [ROUNDS]]        # default target/release, 4

The service is `BIN_DIR/bench origin` when that binary is there (`cargo build --release -p
burrow-tests --bin bench`), otherwise a small asyncio server in this script. Both processes
inherit this environment, so `MALLOC_ARENA_MAX=2 python3 bench/memory.py` A/Bs glibc settings;
AGENT_ENV / EDGE_ENV ("K=V K=V") set variables for one side only. IDLE=seconds and LOAD=seconds
shorten a run. Fixed loopback ports 18280 (HTTP), 18643 (QUIC), 17281 (admin), 18901 (service):
a measurement to run by hand, not a test.
"""

import json, os, re, subprocess, sys, tempfile, time, urllib.request
BIN = sys.argv[1] if len(sys.argv) > 1 else "target/release"
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 4
LOAD, IDLE = float(os.environ.get("LOAD", 6)), float(os.environ.get("IDLE", 20))
D = tempfile.mkdtemp(prefix="burrow-memory-")
HTTP, QUIC, ADMIN, SVC = 18280, 18643, 17281, 18901
SERVICE = r"""
import asyncio, sys
BODY = b'{"service":"memory.py","ok":true,"padding":"' + b'x' * 50 + b'"}\n'
OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n' % len(BODY)
class H(asyncio.Protocol):
    def connection_made(self, t): self.t, self.buf = t, b''
    def data_received(self, data):
        self.buf += data
        while b'\r\n\r\n' in self.buf:
            head, self.buf = self.buf.split(b'\r\n\r\n', 1)
            close = b'connection: close' in head.lower()
            self.t.write(OK + (b'Connection: close\r\n\r\n' if close else b'\r\n') + BODY)
            if close: self.t.close(); return
async def main():
    s = await asyncio.get_running_loop().create_server(H, '127.0.0.1', int(sys.argv[1]), backlog=1024)
    await s.serve_forever()
asyncio.run(main())
"""

def side_env(var):
    return dict(kv.split("=", 1) for kv in os.environ.get(var, "").split())

def get(url, host=None, data=None, headers=None):
    req = urllib.request.Request(url, data=data, headers=dict(headers or {}, **({"Host": host} if host else {})))
    try:
        return urllib.request.urlopen(req, timeout=5)
    except Exception as e:
        return getattr(e, "code", 0) and e

def until(ok, what, limit=30):
    t0 = time.monotonic()
    while not ok():
        if time.monotonic() - t0 > limit: sys.exit(f"memory.py: {what} not up after {limit} s (logs in {D})")
        time.sleep(0.05)

def sample(pid):
    status = open(f"/proc/{pid}/status").read()
    kb = lambda k: int(re.search(rf"^{k}:\s+(\d+) kB", status, re.M).group(1))
    return kb("VmRSS"), kb("VmHWM"), len(os.listdir(f"/proc/{pid}/fd"))

def wrk(host, conns, extra):
    out = subprocess.run(["wrk", "-t2", f"-c{conns}", f"-d{LOAD:g}s", "-H", f"Host: {host}", *extra,
        f"http://127.0.0.1:{HTTP}/"], capture_output=True, text=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errs = re.search(r"Socket errors: (.*)", out)
    return rps, (f" non-2xx {bad.group(1)}" if bad else "") + (f" socket errors: {errs.group(1)}" if errs else "")

procs = []
try:
    conf = f"{D}/edge.toml"
    open(conf, "w").write(f'domain = "tunnel.localhost"\nstate_dir = "{D}/state"\n'
        f'[public]\nhttp = "127.0.0.1:{HTTP}"\n[agents]\nlisten = "127.0.0.1:{QUIC}"\nserver_name = "localhost"\n'
        f'[admin]\nlisten = "127.0.0.1:{ADMIN}"\n'
        # Lift the rate limit and stream caps: this measures memory, not the limits.
        '[limits]\nrate = 0\nburst = 10000000\nstreams_per_devbox = 1000000\nconnections_per_client = 1000000\n')
    if os.path.exists(f"{BIN}/bench"):
        svc_cmd, svc_name = [f"{BIN}/bench", "origin", "--listen", f"127.0.0.1:{SVC}"], "bench origin"
    else:
        svc_cmd, svc_name = [sys.executable, "-c", SERVICE, str(SVC)], "asyncio service"
    procs.append(subprocess.Popen(svc_cmd, stdout=subprocess.DEVNULL, stderr=open(f"{D}/service.log", "w")))
    edge = subprocess.Popen([f"{BIN}/burrow-edge", "serve", "--config", conf], env=dict(os.environ, RUST_LOG="warn", **side_env("EDGE_ENV")),
        stdout=subprocess.DEVNULL, stderr=open(f"{D}/edge.log", "w"))
    procs.append(edge)
    until(lambda: get(f"http://127.0.0.1:{ADMIN}/healthz"), "edge")
    tok = open(f"{D}/state/admin.token").read().strip()
    box = json.load(get(f"http://127.0.0.1:{ADMIN}/v1/devboxes", data=json.dumps({"tunnel": {"auth_mode": "open"}}).encode(),
        headers={"Authorization": f"Bearer {tok}", "Content-Type": "application/json"}))
    host = f"{SVC}-{box['tunnel']['tunnel_key']}.tunnel.localhost"
    agent = subprocess.Popen([f"{BIN}/burrow-agent", "--edge", f"127.0.0.1:{QUIC}", "--ca", f"{D}/state/agent-ca.pem",
        "--server-name", "localhost", "--state-dir", f"{D}/agent-state"],
        env=dict(os.environ, BURROW_AGENT_TOKEN=box["agent_token"], RUST_LOG="warn", **side_env("AGENT_ENV")),
        stdout=subprocess.DEVNULL, stderr=open(f"{D}/agent.log", "w"))
    procs.append(agent)
    until(lambda: getattr(get(f"http://127.0.0.1:{HTTP}/", host), "status", 0) == 200, "tunnel")
    time.sleep(2)
    ab = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k.startswith("GLIBC_")}
    print(f"{BIN}, service: {svc_name}, {ROUNDS} rounds of {LOAD:g} s -c64 keep-alive + {LOAD:g} s -c16 close + {IDLE:g} s idle"
          + (f", env {ab}" if ab else "") + "".join(f", {v} {os.environ[v]}" for v in ("AGENT_ENV", "EDGE_ENV") if os.environ.get(v)))
    print("| when | agent RSS MB | agent fds | edge RSS MB | edge fds | keep-alive req/s | close req/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    def row(when, ka="", cl=""):
        (ar, _, af), (er, _, ef) = sample(agent.pid), sample(edge.pid)
        print(f"| {when} | {ar/1024:.1f} | {af} | {er/1024:.1f} | {ef} | {ka} | {cl} |", flush=True)
    row("baseline")
    notes = []
    for r in range(1, ROUNDS + 1):
        ka, n1 = wrk(host, 64, [])
        cl, n2 = wrk(host, 16, ["-H", "Connection: close"])
        notes += [f"round {r} keep-alive:{n1}"] * bool(n1) + [f"round {r} close:{n2}"] * bool(n2)
        row(f"round {r}, after load", f"{ka:.0f}", f"{cl:.0f}")
        time.sleep(IDLE)
        row(f"round {r}, after {IDLE:g} s idle")
    (_, ah, _), (_, eh, _) = sample(agent.pid), sample(edge.pid)
    print(f"peak RSS (VmHWM): agent {ah/1024:.1f} MB, edge {eh/1024:.1f} MB")
    for n in notes: print(n)
finally:
    for p in procs: p.kill()
