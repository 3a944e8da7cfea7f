#!/usr/bin/env python3
"""An edge crash as users meet it: the release `burrow-edge` killed with SIGKILL at a random
moment and started again on the same addresses and state_dir (its stateless-reset key kept),
a release `burrow-agent` connected to it, and a request every 20 ms until the first 200.
Prints, for each trial, how long after the new edge was up (its /healthz answering) the
tunnel served again.

    cargo build --release -p burrow-quickstart -p burrow-agent
    python3 bench/edge_crash.py [BIN_DIR [TRIALS]]      # default target/release, 8

Uses fixed loopback ports 18080 (HTTP), 18443 (QUIC), 17081 (admin) and 18900 (a python
http.server as the devbox's service): a measurement to run by hand, not a test.
"""

import json, os, random, signal, subprocess, sys, tempfile, time, urllib.request
BIN = sys.argv[1] if len(sys.argv) > 1 else "target/release"
TRIALS = int(sys.argv[2]) if len(sys.argv) > 2 else 8
D = tempfile.mkdtemp()
HTTP, QUIC, ADMIN = 18080, 18443, 17081
def edge():
    return subprocess.Popen([f"{BIN}/burrow-edge", "serve", "--domain", "tunnel.localhost", "--state-dir", D,
        "--public-http", f"127.0.0.1:{HTTP}", "--agents-listen", f"127.0.0.1:{QUIC}", "--admin-listen", f"127.0.0.1:{ADMIN}"],
        stdout=subprocess.DEVNULL, stderr=open(f"{D}/edge.log", "a"))
def wait_up():
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{ADMIN}/healthz", timeout=1); return
        except Exception as e:
            if hasattr(e, 'code'): return
            time.sleep(0.005)
e = edge(); wait_up()
tok = open(f"{D}/admin.token").read().strip()
req = urllib.request.Request(f"http://127.0.0.1:{ADMIN}/v1/devboxes", data=json.dumps({"tunnel": {"auth_mode": "open"}}).encode(),
    headers={"Authorization": f"Bearer {tok}", "Content-Type": "application/json"})
box = json.load(urllib.request.urlopen(req))
key = box["tunnel"]["tunnel_key"]
svc = subprocess.Popen([sys.executable, "-m", "http.server", "18900", "--bind", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
env = dict(os.environ, BURROW_AGENT_TOKEN=box["agent_token"], BURROW_STATE_DIR=D, RUST_LOG="warn")
ag = subprocess.Popen([f"{BIN}/burrow-agent", "--edge", f"127.0.0.1:{QUIC}", "--ca", f"{D}/agent-ca.pem", "--server-name", "tunnel.localhost"],
    env=env, stdout=subprocess.DEVNULL, stderr=open(f"{D}/agent.log", "a"))
def get():
    r = urllib.request.Request(f"http://127.0.0.1:{HTTP}/", headers={"Host": f"18900-{key}.tunnel.localhost"})
    try:
        return urllib.request.urlopen(r, timeout=10).status
    except Exception as ex:
        return getattr(ex, 'code', 0)
def first_200():
    t0 = time.monotonic()
    while get() != 200:
        time.sleep(0.02)
        if time.monotonic() - t0 > 30: return None
    return time.monotonic() - t0
first_200()
res = []
for i in range(TRIALS):
    time.sleep(random.uniform(0.2, 5.2))
    e.send_signal(signal.SIGKILL); e.wait()
    e = edge(); wait_up()
    res.append(first_200())
    print(f"trial {i}: first 200 {res[-1]*1000:.0f} ms after the new edge was up", flush=True)
ok = sorted(r for r in res if r is not None)
print(f"{BIN}: n={len(res)} p50={ok[len(ok)//2]*1000:.0f} ms max={ok[-1]*1000:.0f} ms")
for p in (e, ag, svc): p.kill()
