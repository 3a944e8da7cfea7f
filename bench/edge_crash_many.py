#!/usr/bin/env python3
"""Many agents through an edge crash: N release `burrow-agent` processes (one devbox each)
connected to one release `burrow-edge`; the edge is killed with SIGKILL and started again on the
same addresses and state_dir. Prints, per trial, how long after the new edge was up (its
/healthz answering) the first, half, 99 % and all of the agents were connected again, read
from the edge's `burrow_edge_agents_connected` gauge every 20 ms.

    cargo build --release -p burrow-quickstart -p burrow-agent
    python3 bench/edge_crash_many.py [BIN_DIR [AGENTS [TRIALS]]]   # target/release, 1000, 3

Uses fixed loopback ports 18080 (HTTP), 18443 (QUIC), 17081 (admin) and 17082 (metrics); each
agent takes about 6 MB: a measurement to run by hand, not a test.
"""

import json, os, random, resource, signal, subprocess, sys, tempfile, time, urllib.request

BIN = sys.argv[1] if len(sys.argv) > 1 else "target/release"
AGENTS = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
TRIALS = int(sys.argv[3]) if len(sys.argv) > 3 else 3
D = tempfile.mkdtemp()
HTTP, QUIC, ADMIN, METRICS = 18080, 18443, 17081, 17082

soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def edge():
    return subprocess.Popen(
        [f"{BIN}/burrow-edge", "serve", "--domain", "tunnel.localhost", "--state-dir", D,
         "--public-http", f"127.0.0.1:{HTTP}", "--agents-listen", f"127.0.0.1:{QUIC}",
         "--admin-listen", f"127.0.0.1:{ADMIN}", "--metrics-listen", f"127.0.0.1:{METRICS}"],
        env=dict(os.environ, RUST_LOG="warn"),
        stdout=subprocess.DEVNULL, stderr=open(f"{D}/edge.log", "a"))


def wait_up():
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{ADMIN}/healthz", timeout=1)
            return
        except Exception as e:
            if hasattr(e, "code"):
                return
            time.sleep(0.005)


def connected():
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{METRICS}/metrics", timeout=2).read().decode()
    except Exception:
        return 0
    for line in text.splitlines():
        if line.startswith("burrow_edge_agents_connected "):
            return int(float(line.split()[1]))
    return 0


def admin(path, body):
    tok = open(f"{D}/admin.token").read().strip()
    req = urllib.request.Request(f"http://127.0.0.1:{ADMIN}{path}", data=json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {tok}", "Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req))


e = edge()
wait_up()
agents = []
for i in range(AGENTS):
    box = admin("/v1/devboxes", {"tunnel": {"auth_mode": "open"}})
    state = f"{D}/agent-{i}"
    os.mkdir(state)
    env = dict(os.environ, BURROW_AGENT_TOKEN=box["agent_token"], BURROW_STATE_DIR=state, RUST_LOG="warn")
    log = open(f"{D}/agent-{i}.log", "a") if i < 3 else subprocess.DEVNULL
    agents.append(subprocess.Popen(
        [f"{BIN}/burrow-agent", "--edge", f"127.0.0.1:{QUIC}", "--ca", f"{D}/agent-ca.pem",
         "--server-name", "tunnel.localhost"], env=env, stdout=subprocess.DEVNULL, stderr=log))
t0 = time.monotonic()
while connected() < AGENTS:
    if time.monotonic() - t0 > 120:
        sys.exit(f"only {connected()} of {AGENTS} agents connected after 120 s; see {D}")
    time.sleep(0.1)
print(f"{AGENTS} agents connected after {time.monotonic() - t0:.1f} s", flush=True)

worst = []
for trial in range(TRIALS):
    # Past the agents' `reconnect.healthy_after` (30 s): a session that lasted less counts as
    # short-lived and the next dial backs off, which is not what a lone crash meets.
    time.sleep(random.uniform(31.0, 33.0))
    e.send_signal(signal.SIGKILL)
    e.wait()
    e = edge()
    wait_up()
    up = time.monotonic()
    marks, last = {}, 0
    while last < AGENTS and time.monotonic() - up < 60:
        last = connected()
        now = (time.monotonic() - up) * 1000
        for name, n in (("first", 1), ("half", AGENTS // 2), ("99%", AGENTS * 99 // 100), ("all", AGENTS)):
            if last >= n and name not in marks:
                marks[name] = now
        time.sleep(0.02)
    shown = ", ".join(f"{k} {v:.0f} ms" for k, v in marks.items())
    # The new edge's CPU since it started: mostly the handshakes of the agents coming back.
    fields = open(f"/proc/{e.pid}/stat").read().rsplit(")", 1)[1].split()
    cpu_ms = (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")
    print(f"trial {trial}: {last} of {AGENTS} back; {shown}; edge CPU {cpu_ms:.0f} ms", flush=True)
    worst.append(marks.get("all", float("inf")))
print(f"{AGENTS} agents, {TRIALS} trials: all back after at most {max(worst):.0f} ms "
      f"(per trial: {', '.join(f'{w:.0f}' for w in worst)} ms)")
for p in agents + [e]:
    p.kill()
