#!/usr/bin/env python3
"""A devbox VM paused and continued, as users meet it: the release `burrow-agent` inside a QEMU
guest (TCG; tests/vm/, the guest of tests/tests/vm.rs), connected through QEMU's user-mode network
to a release `burrow-edge` on loopback, is paused with QMP `stop` for PAUSE seconds (past QUIC's
idle timeout, 20 s) and continued, alternately as it is (all guest clocks frozen across the
pause, as after a snapshot restore) and with its wall clock stepped to the host's right after
`cont` (NTP after a resume). A request every 20 ms from `cont` on; prints, per trial, the time
from `cont` to the first 200 through the tunnel, when the agent logged its reconnect, how far the
guest's clocks moved across the pause, then p50 and max per variant.

    cargo build --release -p burrow-quickstart -p burrow-agent
    python3 bench/vm_resume.py [BIN_DIR [TRIALS [PAUSE]]]   # target/release, 3 per variant, 30 s

The agent runs with its defaults; BURROW_LIVENESS_* variables set its `[liveness]` keys
(BURROW_LIVENESS_NUDGE_INTERVAL=5s: `nudge_interval = "5s"`), as they would on the host.

Needs qemu-system-x86_64 and busybox-static (`bash tests/run --install-only`). Every address is
loopback (the guest's 10.0.2.2 is the host's 127.0.0.1); a measurement to run by hand, not a test.
About (PAUSE + 5 s) x 2 x TRIALS, plus ~10 s to boot: 3.5 min for 3 trials.
"""

import atexit, json, os, random, re, socket, statistics, subprocess, sys, tempfile, threading, time
import urllib.request

BIN = sys.argv[1] if len(sys.argv) > 1 else "target/release"
TRIALS = int(sys.argv[2]) if len(sys.argv) > 2 else 3
PAUSE = float(sys.argv[3]) if len(sys.argv) > 3 else 30.0
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D = tempfile.mkdtemp()
PORT = 8080  # the guest's httpd


class Log:
    """Lines of a pipe, each with the monotonic time it arrived, read on a thread."""
    def __init__(self, pipe):
        self.lines, self.cond = [], threading.Condition()
        threading.Thread(target=self._read, args=(pipe,), daemon=True).start()
    def _read(self, pipe):
        for raw in pipe:
            with self.cond:
                self.lines.append((time.monotonic(), raw.decode(errors="replace").rstrip("\r\n")))
                self.cond.notify_all()
    def wait(self, needle, start=0, timeout=30.0):
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                for at, line in self.lines[start:]:
                    if needle in line:
                        return at, line
                if time.monotonic() > end:
                    sys.exit(f"no `{needle}` within {timeout} s:\n" + "\n".join(l for _, l in self.lines))
                self.cond.wait(0.1)


def sh(*cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout

# The guest, with this agent in it.
out = sh("bash", f"{ROOT}/tests/vm/build-guest.sh", f"{BIN}/burrow-agent", f"{ROOT}/target/vm-guest")
guest = dict(l.split("=", 1) for l in out.split())

# The edge, its ports read from its log.
edge = subprocess.Popen([f"{BIN}/burrow-edge", "serve", "--domain", "tunnel.localhost", "--state-dir", D,
    "--public-http", "127.0.0.1:0", "--agents-listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"],
    env=dict(os.environ, RUST_LOG="info", NO_COLOR="1"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
atexit.register(edge.kill)
_, line = Log(edge.stderr).wait("edge listening")
HTTP, AGENTS, ADMIN = (re.search(rf"{k}=(?:Some\()?127\.0\.0\.1:(\d+)", line).group(1) for k in ("http", "agents", "admin"))
tok = open(f"{D}/admin.token").read().strip()
req = urllib.request.Request(f"http://127.0.0.1:{ADMIN}/v1/devboxes", data=json.dumps({"tunnel": {"auth_mode": "open"}}).encode(),
    headers={"Authorization": f"Bearer {tok}", "Content-Type": "application/json"})
box = json.load(urllib.request.urlopen(req))
key = box["tunnel"]["tunnel_key"]
with open(f"{D}/agent.toml", "w") as f:
    f.write(f'edge = "10.0.2.2:{AGENTS}"\nserver_name = "tunnel.localhost"\nca = "/etc/burrow/agent-ca.pem"\n'
            f'token_file = "/etc/burrow/agent.token"\nstate_dir = "/tmp/burrow"\n[forward]\nallow_ports = [{PORT}]\n')
    liveness = {k[len("BURROW_LIVENESS_"):].lower(): v for k, v in os.environ.items() if k.startswith("BURROW_LIVENESS_")}
    f.write("[liveness]\n" + "".join(f'{k} = "{v}"\n' for k, v in liveness.items()))
with open(f"{D}/agent.token", "w") as f:
    f.write(box["agent_token"])

# QEMU connects to our QMP socket; the console is its stdin and stdout.
qmp_path = f"{D}/qmp.sock"
listener = socket.socket(socket.AF_UNIX)
listener.bind(qmp_path)
listener.listen(1)
booted = time.monotonic()
qemu = subprocess.Popen(["qemu-system-x86_64", "-accel", "tcg", "-m", "512", "-smp", "1", "-nodefaults",
    "-no-user-config", "-display", "none", "-no-reboot", "-nic", "user,model=e1000",
    "-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console",
    "-chardev", f"socket,id=qmp,path={qmp_path}", "-mon", "chardev=qmp,mode=control",
    "-kernel", guest["kernel"], "-initrd", guest["initramfs"], "-append", "console=ttyS0 quiet panic=1",
    "-fw_cfg", f"name=opt/burrow/agent.toml,file={D}/agent.toml",
    "-fw_cfg", f"name=opt/burrow/agent.token,file={D}/agent.token",
    "-fw_cfg", f"name=opt/burrow/agent-ca.pem,file={D}/agent-ca.pem"],
    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
atexit.register(qemu.kill)
console = Log(qemu.stdout)
listener.settimeout(30)
qmp = listener.accept()[0].makefile("rw")

def execute(command):
    qmp.write(json.dumps({"execute": command}) + "\n"); qmp.flush()
    while True:
        reply = json.loads(qmp.readline())
        if "return" in reply: return reply["return"]
        if "error" in reply: sys.exit(f"QMP {command}: {reply}")

json.loads(qmp.readline())  # the greeting
execute("qmp_capabilities")

def send(line):
    qemu.stdin.write((line + "\n").encode()); qemu.stdin.flush()

def clocks(start):
    _, line = console.wait("burrow-clocks:", start)
    f = dict(w.split("=") for w in line.split()[1:])
    return float(f["boottime"]), int(f["monotonic_ns"]) / 1e9, float(f["realtime"])

def get():
    r = urllib.request.Request(f"http://127.0.0.1:{HTTP}/", headers={"Host": f"{PORT}-{key}.tunnel.localhost"})
    try:
        return urllib.request.urlopen(r, timeout=10).status
    except Exception as ex:
        return getattr(ex, "code", 0)

def first_200(t0):
    while get() != 200:
        time.sleep(0.02)
        if time.monotonic() - t0 > 60: return None
    return time.monotonic() - t0

console.wait("burrow-guest: ready")
up = first_200(booted)
print(f"guest up: first 200 {up:.1f} s after QEMU started; "
      f"{console.wait('burrow-guest: clocksource')[1].split(': ', 1)[1]}", flush=True)
for at, line in console.lines:
    print(f"    {(at - booted) * 1000:6.0f} ms  {line}", flush=True)

res = {"frozen": [], "stepped": []}
for i in range(TRIALS):
    for variant in res:
        time.sleep(random.uniform(1, 6))  # a random phase of the nudges and the 5 s heartbeat
        start = len(console.lines)
        t_before = time.monotonic(); send("clocks"); before = clocks(start)
        execute("stop")
        time.sleep(PAUSE)
        start = len(console.lines)
        t0 = time.monotonic()
        execute("cont")
        paused = t0 - t_before
        send("clocks" if variant == "frozen" else f"clocks; step_clock {int(time.time())}")
        took = first_200(t0)
        after = clocks(start)
        moved = " ".join(f"{n} {a - b:+.2f} s" for n, a, b in zip(("boottime", "monotonic", "realtime"), after, before))
        events = [f"{what} {(at - t0) * 1000:.0f} ms" for at, line in console.lines[start:]
                  for what, needle in (("resume detected", "resume detected"), ("reconnecting", "reconnecting"),
                                       ("connected", ": connected")) if needle in line]
        res[variant].append(took)
        print(f"trial {i} {variant}: first 200 {took * 1000:.0f} ms after cont; agent: {', '.join(events) or '-'}; "
              f"guest clocks across {paused:.1f} s: {moved}", flush=True)
        for at, line in console.lines[start:]:
            if "burrow_agent" in line or "burrow-stepped" in line:
                print(f"    {(at - t0) * 1000:6.0f} ms  {line}", flush=True)

for variant, xs in res.items():
    ok = sorted(x for x in xs if x is not None)
    failed = len(xs) - len(ok)
    if ok:
        print(f"{variant}: n={len(xs)} p50={statistics.median(ok) * 1000:.0f} ms max={ok[-1] * 1000:.0f} ms"
              + (f" ({failed} never served)" if failed else ""))
