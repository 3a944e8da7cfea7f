#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets into corpus/<target>/.

The files are committed; this script is how they were made, kept so that a seed can be read as
what it means and new ones added the same way. Run it from anywhere: `python3 fuzz/seeds.py`.
It only writes the files it names (existing seeds are left alone).

Two encoders: the wire format (protocol/src/frame.rs, control.rs, stream.rs) for the decode
targets and raw frames, and the structured-input layout that burrow_fuzz's Arbitrary types read
(see fuzz/src/lib.rs) for frame_roundtrip and control_machine. Check a structured seed with
`RUSTC_BOOTSTRAP=1 cargo fuzz fmt -s none <target> corpus/<target>/<file>`.
"""

import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def write(target, name, data):
    if isinstance(data, str):
        data = data.encode()
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


# --- wire format -------------------------------------------------------------------------

def frame(ty, body):
    return bytes([ty]) + struct.pack(">H", len(body)) + body


def wstr(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack(">H", len(b)) + b


def wtunnel(t):
    if t is None:
        return b"\x00"
    key, mode, url = t
    return b"\x01" + wstr(key) + bytes([mode]) + wstr(url)


def hello(token="t0k3n", agent="burrow-agent/0.1.0", lo=1, hi=1, instance=7, takeover=1, previous=5):
    """A hello; previous=None: the older layout, without the trailing `previous`."""
    body = struct.pack(">HH", lo, hi) + wstr(token) + wstr(agent)
    body += struct.pack(">Q", instance) + bytes([takeover])
    if previous is not None:
        body += struct.pack(">Q", previous)
    return frame(0x01, body)


TUNNEL = ("k3v9x2q7ma", 1, "https://{port}-k3v9x2q7ma.tunnel.example.com")


def welcome(version=1, devbox="devbox-1", tunnel=TUNNEL):
    return frame(0x02, struct.pack(">H", version) + wstr(devbox) + wtunnel(tunnel))


def reject(code=1, message="unknown or revoked agent token"):
    return frame(0x03, bytes([code]) + wstr(message))


def ping(seq):
    return frame(0x04, struct.pack(">Q", seq))


def pong(seq):
    return frame(0x05, struct.pack(">Q", seq))


def update(tunnel=TUNNEL):
    return frame(0x06, wtunnel(tunnel))


def go_away(code=1, message="the edge is shutting down"):
    return frame(0x07, bytes([code]) + wstr(message))


def header(port, kind=1, client=None, version=1):
    body = struct.pack(">HHB", version, port, kind)
    if client is None:
        body += b"\x00"
    elif len(client[0]) == 4:
        body += b"\x01\x04" + bytes(client[0]) + struct.pack(">H", client[1])
    else:
        body += b"\x01\x06" + bytes(client[0]) + struct.pack(">H", client[1])
    return frame(0x40, body)


def answer(refuse=None):
    return frame(0x41, b"\x00" if refuse is None else bytes([1, refuse]))


# --- structured input (fuzz/src/lib.rs) ----------------------------------------------------

def u8(x):
    return struct.pack("<B", x)


def u16(x):
    return struct.pack("<H", x)


def u32(x):
    return struct.pack("<I", x)


def u64(x):
    return struct.pack("<Q", x)


def boolean(b):
    return b"\x01" if b else b"\x00"


def option(v):
    return b"\x00" if v is None else b"\x01" + v


def tag(i, n):
    """The u32 that makes a derived enum of n variants pick variant i."""
    x = -(-(i << 32) // n)  # ceil(i * 2^32 / n)
    assert (x * n) >> 32 == i and x < 1 << 32
    return u32(x)


def text(s, repeat=0):
    b = s.encode() if isinstance(s, str) else s
    assert len(b) <= 255
    return u8(len(b)) + b + u8(repeat)


def raw(b):
    return u16(len(b)) + b


def rest_list(items):
    """A list that is the last field of the input: each element after a 1 byte."""
    return b"".join(b"\x01" + it for it in items)


def a_tunnel(key="k3v9x2q7ma", authenticated=False, url="https://{port}-k3v9x2q7ma.example.com", r=0):
    return text(key, r) + boolean(authenticated) + text(url, r)


def m_hello(lo=1, hi=1, token="t0k3n", agent="burrow-agent/0.1.0", instance=7, takeover=True,
            previous=5, r=0):
    return (tag(0, 7) + u16(lo) + u16(hi) + text(token, r) + text(agent, r) + u64(instance)
            + boolean(takeover) + u64(previous))


def m_welcome(version=1, devbox="devbox-1", tunnel=None, r=0):
    return tag(1, 7) + u16(version) + text(devbox, r) + option(tunnel)


def m_reject(reason=0, message="no", r=0):
    return tag(2, 7) + u8(reason) + text(message, r)


def m_ping(seq):
    return tag(3, 7) + u64(seq)


def m_pong(seq):
    return tag(4, 7) + u64(seq)


def m_update(tunnel):
    return tag(5, 7) + option(tunnel)


def m_go_away(reason=0, message="bye", r=0):
    return tag(6, 7) + u8(reason) + text(message, r)


def a_header(port, raw_kind=False, client=None, version=1):
    return u16(version) + u16(port) + boolean(raw_kind) + option(client)


def v4(ip, port):
    return tag(0, 2) + bytes(ip) + u16(port)


def v6(ip, port, flow=0, scope=0):
    return tag(1, 2) + bytes(ip) + u16(port) + u32(flow) + u32(scope)


def i_control(m):
    return tag(0, 3) + m


def i_header(h):
    return tag(1, 3) + h


def i_answer(refuse=None):
    return tag(2, 3) + (tag(0, 2) if refuse is None else tag(1, 2) + u8(refuse))


AGENT, EDGE, BOTH = 0, 1, 2


def s_built(side, m):
    return tag(0, 5) + tag(side, 3) + m


def s_raw(side, frame_bytes):
    return tag(1, 5) + tag(side, 3) + raw(frame_bytes)


def s_eos(side):
    return tag(2, 5) + tag(side, 3)


def s_sent(side, m):
    return tag(3, 5) + tag(side, 3) + m


def s_ping(side):
    return tag(4, 5) + tag(side, 3)


def conversation(steps, versions=None):
    v = None if versions is None else u16(versions[0]) + u16(versions[1])
    return option(v) + rest_list(steps)


LOOPBACK6 = [0] * 15 + [1]


def main():
    # control_decode / stream_decode: a few more beside the hand-written ones.
    write("control_decode", "hello_no_takeover", hello(takeover=0, instance=0, previous=0))
    write("control_decode", "hello_without_previous", hello(previous=None))
    write("control_decode", "hello_previous_cut", frame(0x01, hello(previous=None)[3:] + b"\x00\x00\x07"))
    write("control_decode", "hello_token_512", hello(token="a" * 512))
    write("control_decode", "welcome_then_ping_then_cut", welcome() + ping(1) + pong(2)[:-3])
    write("control_decode", "too_large", b"\x04\x40\x01")
    write("control_decode", "go_away_revoked_utf8", go_away(3, "révoqué"))
    write("stream_decode", "header_then_answer", header(3000) + answer())
    write("stream_decode", "refuse_each", b"".join(answer(c) for c in range(1, 6)))
    write("stream_decode", "header_port_65535_v9", header(65535, 2, version=9))

    # frame_roundtrip
    fr = "frame_roundtrip"
    write(fr, "every_control_msg", rest_list([
        i_control(m_hello()),
        i_control(m_welcome(tunnel=a_tunnel())),
        i_control(m_reject(1, "this edge speaks protocol version 1")),
        i_control(m_ping(1)),
        i_control(m_pong(1)),
        i_control(m_update(a_tunnel(authenticated=True))),
        i_control(m_update(None)),
        i_control(m_go_away(2, "replaced")),
    ]))
    write(fr, "stream_frames", rest_list([
        i_header(a_header(3000, client=v4([192, 0, 2, 7], 51000))),
        i_answer(),
        i_header(a_header(22, raw_kind=True, client=v6(LOOPBACK6, 443, 7, 3))),
        i_answer(4),
        i_header(a_header(0)),
    ]))
    write(fr, "long_strings", rest_list([
        i_control(m_hello(token="x" * 100, agent="agent-" * 40, r=15)),
        i_control(m_welcome(devbox="é" * 100, tunnel=a_tunnel("k" * 200, False, "ü" * 120, r=15), r=15)),
        i_control(m_go_away(0, "日本語" * 20, r=15)),
    ]))
    write(fr, "token_at_limit", rest_list([i_control(m_hello(token="t" * 128, r=3))]))
    write(fr, "empty_strings", rest_list([
        i_control(m_hello(token="", agent="", lo=0, hi=65535, instance=2**64 - 1, takeover=False,
                          previous=2**64 - 1)),
        i_control(m_reject(3, "")),
        i_control(m_welcome(version=65535, devbox="", tunnel=a_tunnel("", True, ""))),
    ]))

    # control_machine
    cm = "control_machine"
    write(cm, "happy_path", conversation([
        s_raw(EDGE, hello()),
        s_raw(AGENT, welcome()),
        s_ping(AGENT),
        s_raw(EDGE, ping(1)),
        s_raw(AGENT, pong(1)),
        s_raw(AGENT, ping(9)),
        s_raw(AGENT, update(None)),
        s_raw(AGENT, update()),
        s_raw(AGENT, go_away()),
        s_eos(AGENT),
        s_eos(EDGE),
    ]))
    write(cm, "rejected", conversation([
        s_raw(AGENT, reject()),
        s_raw(AGENT, ping(1)),
        s_eos(AGENT),
    ]))
    write(cm, "agent_shuts_down", conversation([
        s_raw(EDGE, hello()),
        s_raw(AGENT, welcome(tunnel=None)),
        s_sent(AGENT, m_go_away()),
        s_raw(AGENT, ping(4)),
        s_raw(EDGE, go_away(1, "the agent is shutting down")),
        s_raw(EDGE, ping(5)),
        s_eos(BOTH),
    ]))
    write(cm, "edge_replaces_agent", conversation([
        s_built(BOTH, m_hello()),
        s_built(AGENT, m_welcome()),
        s_ping(BOTH),
        s_sent(EDGE, m_go_away(1, "replaced")),
        s_raw(AGENT, go_away(2, "another agent with this devbox's token connected")),
        s_raw(EDGE, ping(2)),
        s_built(AGENT, m_pong(1)),
        s_raw(AGENT, go_away(2)),
    ]))
    write(cm, "stale_pong", conversation([
        s_raw(AGENT, welcome()),
        s_ping(AGENT),
        s_ping(AGENT),
        s_raw(AGENT, pong(1)),
        s_raw(AGENT, pong(2)),
        s_raw(AGENT, pong(2)),
    ]))
    write(cm, "violations", conversation([
        s_raw(BOTH, ping(1)),
        s_raw(BOTH, hello()),
        s_raw(BOTH, welcome()),
    ]))
    write(cm, "handshake_twice", conversation([
        s_raw(EDGE, hello()),
        s_raw(AGENT, welcome()),
        s_raw(EDGE, hello()),
        s_raw(AGENT, welcome()),
    ]))
    write(cm, "edge_only_messages_from_agent", conversation([
        s_raw(EDGE, hello()),
        s_raw(EDGE, update()),
        s_raw(EDGE, ping(3)),
    ]))
    write(cm, "version_mismatch", conversation([s_raw(AGENT, welcome(version=1))], versions=(2, 3)))
    write(cm, "edge_rejects", conversation([
        s_raw(EDGE, hello(lo=2, hi=2)),
        s_sent(EDGE, m_reject(1, "this edge speaks protocol version 1")),
        s_raw(EDGE, ping(1)),
    ]))
    write(cm, "go_away_before_welcome", conversation([
        s_sent(AGENT, m_go_away()),
        s_raw(AGENT, welcome()),
        s_raw(AGENT, ping(1)),
        s_eos(AGENT),
    ]))
    write(cm, "end_without_go_away", conversation([
        s_raw(BOTH, hello()),
        s_raw(AGENT, welcome()),
        s_eos(BOTH),
        s_raw(BOTH, ping(1)),
    ]))
    write(cm, "undecodable_frames", conversation([
        s_raw(BOTH, b"\x04\x00\x07\x00"),
        s_raw(BOTH, b"\x40\x00\x00"),
        s_raw(EDGE, hello()[:-1]),
    ]))

    # host_parse: the host, then optionally a line break and a domain.
    hp = "host_parse"
    d = "tunnel.example.com"
    for name, host in [
        ("ok", f"3000-k3v9x2q7ma.{d}"),
        ("ok_upper_dot", "3000-K3V9X2Q7MA.Tunnel.Example.COM."),
        ("ok_port_suffix", f"1-a.{d}:8080"),
        ("ok_max_port", f"65535-a.{d}"),
        ("port_0", f"0-key.{d}"),
        ("port_65536", f"65536-key.{d}"),
        ("port_exponent", f"1e3-key.{d}"),
        ("port_missing", f"-key.{d}"),
        ("port_leading_zero", f"03000-key.{d}"),
        ("port_plus", f"+80-key.{d}"),
        ("port_huge", f"99999999999999999999-key.{d}"),
        ("key_missing", f"3000-.{d}"),
        ("key_underscore", f"3000-k_x.{d}"),
        ("key_hyphen", f"3000-k-x.{d}"),
        ("key_57", f"3000-{'a' * 57}.{d}"),
        ("key_58", f"3000-{'a' * 58}.{d}"),
        ("key_utf8", f"3000-bücher.{d}"),
        ("key_idna", f"3000-xn--bcher-kva.{d}"),
        ("key_kelvin_sign", f"3000-\u212a.{d}"),
        ("idna_domain", "3000-key.xn--bcher-kva.example"),
        ("utf8_domain", "3000-key.bücher.example"),
        ("other_domain", "3000-key.other.com"),
        ("suffix_not_label", f"3000-key.evil{d}"),
        ("extra_label", f"a.3000-key.{d}"),
        ("domain_only", d),
        ("ipv6", "[::1]:80"),
        ("ipv4", "127.0.0.1:3000"),
        ("empty", ""),
        ("port_suffix_bad", f"3000-key.{d}:abc"),
        ("port_suffix_empty", f"3000-key.{d}:"),
        ("two_dots", f"3000-key.{d}.."),
        ("custom_domain", "3000-key.example.org\nexample.org"),
        ("one_label_domain", "8080-dev.a"),
        ("localhost", "80-key.localhost\nlocalhost"),
    ]:
        write(hp, name, host)

    # header_filter: a header block.
    hf = "header_filter"
    write(hf, "plain_get", "Host: 3000-k3v9x2q7ma.tunnel.example.com\r\nUser-Agent: curl/8.5.0\r\n"
          "Accept: */*\r\n")
    write(hf, "hop_by_hop", "Host: h\nConnection: keep-alive\nKeep-Alive: timeout=5\nTE: trailers\n"
          "Transfer-Encoding: chunked\nTrailer: x-checksum\nProxy-Authorization: Basic YTpi\n"
          "Proxy-Connection: keep-alive\nProxy-Authenticate: Basic\nX-Kept: 1\n")
    write(hf, "websocket", "Host: h\nConnection: Upgrade\nUpgrade: websocket\n"
          "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\nSec-WebSocket-Version: 13\n")
    write(hf, "websocket_keep_alive", "Connection: keep-alive, Upgrade\nUpgrade: websocket\n"
          "Keep-Alive: 5\n")
    write(hf, "h2c_without_upgrade_token", "Upgrade: h2c\nConnection: HTTP2-Settings\n"
          "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\n")
    write(hf, "connection_names", "Connection: x-secret, close\nX-Secret: 1\nX-Kept: 1\n")
    write(hf, "connection_names_cookie_host_auth", "Connection: cookie,host , authorization\n"
          "Cookie: a=1\nHost: h\nAuthorization: Basic YTpi\n")
    write(hf, "two_connection_headers", "Connection: x-a\nConnection: x-b\nX-A: 1\nX-B: 2\nX-C: 3\n")
    write(hf, "split_cookies", "Cookie: a=1\nCookie: b=2\nCookie: c=3; d=4\n")
    write(hf, "burrow_token_cookie", "Cookie: a=1; burrow_token=abc\nCookie: burrow_token=def\n")
    write(hf, "bearer", "Authorization: Bearer abc\n")
    write(hf, "bearer_case", "Authorization: bEaReR  abc \n")
    write(hf, "basic_auth", "Authorization: Basic YWxhZGRpbjpvcGVuc2VzYW1l\n")
    write(hf, "forwarding", "X-Forwarded-For: 10.0.0.1\nX-Forwarded-Host: evil\nForwarded: for=1.2.3.4\n"
          "X-Real-IP: 1.2.3.4\n")
    write(hf, "tabs_and_case", "CONNECTION:\tX-Tab\t\nx-tab: 1\nTRANSFER-ENCODING: chunked\n")
    write(hf, "invalid_lines", "no colon here\n: empty name\nbad name: 1\nok: 1\n")

    # agent_config / edge_config: TOML, then optionally NUL and NAME=value / --key=value lines.
    ac = "agent_config"
    readme_agent = """edge = "edge.example.com:443"        # the edge's QUIC listener
ca = "/etc/burrow/agent-ca.pem"      # optional: trust these roots instead of the system's
token_file = "/etc/burrow/agent.token"   # or the token itself in BURROW_AGENT_TOKEN

[forward]
allow_ports = []                     # empty: every port
deny_ports = [22]

[metrics]
listen = "0.0.0.0:9464"              # this port is never forwarded
"""
    readme_tuning = """edge = "edge.example.com:443"
drain_grace = "10s"
[liveness]
heartbeat_interval = "5s"
heartbeat_timeout = "3s"
idle_timeout = "20s"
resume_tick = "1s"
[reconnect]
backoff_initial = "100ms"
backoff_max = "2s"
healthy_after = "30s"
dial_timeout = "3s"
[log]
level = "burrow_agent=debug,info"
format = "json"
"""
    write(ac, "readme", readme_agent)
    write(ac, "readme_tuning", readme_tuning)
    write(ac, "minimal", 'edge = "e:1"\n')
    write(ac, "env_and_flags", 'ca = "ca.pem"\n\0BURROW_EDGE=edge.example.com:443\n'
          "BURROW_FORWARD_ALLOW_PORTS=3000, 8080\n--forward.deny_ports=22\nBURROW_LOG_LEVEL=debug\n"
          "--drain-grace=1s\n--drain_grace=250ms\nRUST_LOG=warn\n")
    write(ac, "env_only", "\0BURROW_EDGE=[::1]:443\nBURROW_AGENT_TOKEN=  tok  \n")
    write(ac, "empty_token", 'edge = "e:1"\n\0BURROW_AGENT_TOKEN= \n')
    write(ac, "broken_toml", "edge = \n")
    write(ac, "unknown_key", 'edge = "e:1"\nedgee = 1\n')
    write(ac, "no_port", 'edge = "nohost"\n')
    write(ac, "idle_shorter", 'edge = "e:1"\n[liveness]\nidle_timeout = "1s"\n')
    write(ac, "zero_duration", 'edge = "e:1"\ndrain_grace = "0s"\n')
    write(ac, "bad_durations", 'edge = "e:1"\n[reconnect]\nbackoff_max = "1e400"\n'
          'dial_timeout = "99999999999999999999h"\nhealthy_after = "5 parsecs"\n')
    write(ac, "bad_ports", 'edge = "e:1"\n[forward]\ndeny_ports = [0]\nallow_ports = [70000]\n')
    write(ac, "bad_ports_env", 'edge = "e:1"\n\0BURROW_FORWARD_DENY_PORTS=22,x\n')
    write(ac, "table_replaced_by_env", 'edge = "e:1"\nforward = 1\n\0BURROW_FORWARD_ALLOW_PORTS=1\n')
    write(ac, "bad_log", 'edge = "e:1"\n[log]\nlevel = "x=what"\nformat = "xml"\n')
    write(ac, "wrong_types", 'edge = 1\n[liveness]\nheartbeat_interval = 5\n')
    write(ac, "metrics_port_0", 'edge = "e:1"\n[metrics]\nlisten = "127.0.0.1:0"\n')

    ec = "edge_config"
    readme_edge = """domain = "tunnel.example.com"        # public URLs are {port}-{key}.{domain}
state_dir = "/var/lib/burrow-edge"   # SQLite store, generated CA, admin token, reset key
drain_grace = "10s"                  # running requests get this long at shutdown

[public]
http = "0.0.0.0:80"                  # plain HTTP (optional)
https = "0.0.0.0:443"                # HTTPS (optional; needs cert and key)
cert = "/etc/burrow/public.pem"      # certificate chain for *.{domain}
key = "/etc/burrow/public.key"

[agents]
listen = "0.0.0.0:443"               # QUIC, UDP
server_name = "edge.example.com"     # the name agents verify (default: domain)
wait = "5s"                          # a request waits this long for an absent agent, then 503
max_waiting = 64                     # requests that may wait per devbox

[admin]
listen = "127.0.0.1:7081"
"""
    write(ec, "readme", readme_edge)
    write(ec, "minimal", 'domain = "a.b"\nstate_dir = "/x"\n[public]\nhttp = "0.0.0.0:80"\n')
    write(ec, "upper_domain_dot", 'domain = "Tunnel.Example.com."\nstate_dir = "s"\n'
          '[public]\nhttp = "[::]:80"\n[metrics]\nlisten = "127.0.0.1:9465"\n')
    write(ec, "env_and_flags", "\0BURROW_DOMAIN=tunnel.example.com\nBURROW_STATE_DIR=/var/lib/b\n"
          "--public.http=0.0.0.0:80\nBURROW_AGENTS_MAX_WAITING=8\n--agents.wait=250ms\n")
    write(ec, "limits", 'domain = "a.b"\nstate_dir = "/x"\n[public]\nhttp = "0.0.0.0:80"\n'
          "[limits]\nmax_head_bytes = 65536\nmax_headers = 50\nhead_timeout = \"5s\"\n"
          "upgrade_idle = \"1h\"\nconnections_per_client = 10\nstreams_per_devbox = 100\n"
          "rate = 0\nburst = 10\nadmin_failures = 3\n")
    write(ec, "limits_negative", 'domain = "a.b"\nstate_dir = "/x"\n[public]\nhttp = "0.0.0.0:80"\n'
          "[limits]\nmax_head_bytes = -1\nrate = 99999999999\nhead_timeout = \"0s\"\n")
    write(ec, "no_domain", 'state_dir = "/x"\n[public]\nhttp = "0.0.0.0:80"\n')
    write(ec, "bad_domain", 'domain = "a_b"\nstate_dir = "/x"\n')
    write(ec, "domain_bad_labels", 'domain = "-a..b-"\nstate_dir = "/x"\n[public]\nhttp = "0.0.0.0:80"\n')
    write(ec, "no_listener", 'domain = "a.b"\nstate_dir = "/x"\n')
    write(ec, "bad_addr", 'domain = "a.b"\nstate_dir = "/x"\n[public]\nhttp = "80"\n')
    write(ec, "https_without_cert", 'domain = "a.b"\nstate_dir = "/x"\n[public]\nhttps = "0.0.0.0:443"\n')
    write(ec, "agents_cert_only", 'domain = "a.b"\nstate_dir = "/x"\n[public]\nhttp = "0.0.0.0:80"\n'
          '[agents]\ncert = "c.pem"\n')
    write(ec, "unknown_key", 'domain = "a.b"\nstate_dir = "/x"\n[public]\nhttpx = "0.0.0.0:80"\n')
    write(ec, "bad_env_int", "\0BURROW_AGENTS_MAX_WAITING=many\n")
    write(ec, "broken_toml", "[public\nhttp = ")

    # Reproducers of what the fuzzers found (see the README's "Long runs").
    # A Connection value that is not ASCII: the headers it names were not stripped.
    # liveness: Input { passive, interval_ms, timeout_ms, steps } with Step = Advance(u16) |
    # Jump(u32) | Pong(u64) | PongLast | Resume | PeerGoAway | Drain (7 variants).
    lv = "liveness"

    def run(passive, interval, timeout, steps):
        return boolean(passive) + u16(interval) + u16(timeout) + rest_list(steps)

    def advance(ms):
        return tag(0, 7) + u16(ms)

    pong_last, resume, peer_go_away, drain = tag(3, 7), tag(4, 7), tag(5, 7), tag(6, 7)
    write(lv, "answered_on_time", run(False, 5000, 3000, [
        advance(10), pong_last, advance(5000), advance(20), pong_last, advance(5000),
    ]))
    write(lv, "missed_then_dead", run(False, 5000, 3000, [advance(9000), advance(3500)]))
    write(lv, "missed_then_answered", run(False, 5000, 3000, [
        advance(3100), pong_last, advance(6000), pong_last,
    ]))
    write(lv, "resume_and_stale_pong", run(False, 5000, 3000, [
        advance(100), resume, tag(2, 7) + u64(1), pong_last, advance(60000),
    ]))
    write(lv, "suspended_for_days", run(False, 5000, 3000, [tag(1, 7) + u32(400000), pong_last]))
    write(lv, "go_away_both_ways", run(False, 1000, 500, [drain, drain, peer_go_away, advance(2000)]))
    write(lv, "passive_edge", run(True, 0, 0, [tag(2, 7) + u64(7), drain, peer_go_away, advance(9)]))
    write(hf, "crash_connection_obs_text", b"Connection: x-a, \x80\nX-A: 1\n")
    # A log level whose field value regex has a DFA that doubles with every `.`: a hang.
    hang = '[{=x........................oc}]'
    write(ac, "timeout_log_level_regex", f'edge = "e:1"\n[log]\nlevel = "{hang}"\n')
    write(ec, "timeout_log_level_regex", 'domain = "a.b"\nstate_dir = "/x"\n[public]\n'
          f'http = "0.0.0.0:80"\n[log]\nlevel = "{hang}"\n')
    # Whitespace before a non-ASCII directive: tracing-subscriber's directive parser slices the
    # untrimmed string with indices of the trimmed one and panics.
    write(ac, "crash_log_level_space_before_utf8", 'edge = "e:1"\n[log]\nlevel = "info, é=debug"\n')
    write(ec, "crash_rust_log_space_before_utf8", 'domain = "a.b"\nstate_dir = "/x"\n[public]\n'
          'http = "0.0.0.0:80"\n\0RUST_LOG= é=info\n')

    h1_response()


def h1_response():
    """A service's answers to the edge's HTTP/1.1 (issue 15). The first byte is the feed:
    bytes arriving at a time are byte // 2 (at least 1); odd answers a HEAD."""
    t = "h1_response"
    write(t, "length", b"\x03HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
    write(t, "chunked", b"\x04HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
          b"5;x=1\r\nhello\r\n0\r\ngrpc-status: 0\r\n\r\n")
    write(t, "interim", b"\x06HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
    write(t, "close", b"\x02HTTP/1.0 200 OK\r\n\r\nuntil close")
    write(t, "head", b"\x05HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n")
    # te_and_cl_answering_head is the fuzzer's own find: a HEAD answer with both framings kept
    # its Content-Length beside the Transfer-Encoding.


if __name__ == "__main__":
    main()
