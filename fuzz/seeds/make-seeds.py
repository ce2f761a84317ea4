#!/usr/bin/env python3
"""Writes the seed corpus of every fuzz target into fuzz/corpus/<target>/.

Seeds are valid inputs of each format, built the way the real writers build them (the
device-state container, virtqueues as a guest driver lays them out, frames as the agent
sends them, layers as image tools write them), plus the real snapshot files in
seeds/snapshot/ (a snapshot microagent-vmm wrote in an integration test: a
guest with one vsock device). Deterministic: running
it twice writes the same files. Crash inputs found later live next to the seeds under
names starting with `crash-`; this script leaves them alone.
"""

import gzip
import hashlib
import io
import json
import os
import struct
import sys
import tarfile

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "..", "corpus")


def put(target, name, data):
    d = os.path.join(CORPUS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


# ---- virtqueues (vhost_blk_request, vsock_packet) --------------------------------
# Layout shared with fuzz/src/lib.rs: 64 KiB of memory, 16 descriptors at 0x0,
# available ring at 0x100, used ring at 0x200, buffers from 0x1000.
F_NEXT, F_WRITE = 1, 2


class Ring:
    def __init__(self):
        self.mem = bytearray(0x3000)
        self.desc = 0
        self.heads = []
        self.buf = 0x1000

    def alloc(self, data_or_len):
        at = self.buf
        data = data_or_len if isinstance(data_or_len, (bytes, bytearray)) else bytes(data_or_len)
        need = max(len(data), 1)
        if at + need > len(self.mem):
            self.mem.extend(bytes(at + need - len(self.mem)))
        self.mem[at:at + len(data)] = data
        self.buf = (at + need + 15) & ~15
        return at

    def chain(self, parts):
        """parts: list of (bytes or int length, writable)."""
        head = self.desc
        for i, (data, writable) in enumerate(parts):
            addr = self.alloc(data)
            length = len(data) if isinstance(data, (bytes, bytearray)) else data
            flags = (F_WRITE if writable else 0) | (F_NEXT if i < len(parts) - 1 else 0)
            nxt = self.desc + 1 if i < len(parts) - 1 else 0
            struct.pack_into("<QIHH", self.mem, self.desc * 16, addr, length, flags, nxt)
            self.desc += 1
        self.heads.append(head)

    def image(self):
        struct.pack_into("<HH", self.mem, 0x100, 0, len(self.heads))
        for i, h in enumerate(self.heads):
            struct.pack_into("<H", self.mem, 0x104 + 2 * i, h)
        return bytes(self.mem)


def blk_header(kind, sector):
    return struct.pack("<IIQ", kind, 0, sector)


def blk_seeds():
    IN, OUT, FLUSH, GET_ID, DISCARD, WZ = 0, 1, 4, 8, 11, 13
    r = Ring()
    r.chain([(blk_header(IN, 0), False), (1024, True), (1, True)])
    r.chain([(blk_header(OUT, 2), False), (b"\x5a" * 512, False), (1, True)])
    r.chain([(blk_header(FLUSH, 0), False), (1, True)])
    r.chain([(blk_header(GET_ID, 0), False), (20, True), (1, True)])
    r.chain([(blk_header(DISCARD, 0), False), (struct.pack("<QII", 4, 8, 0), False), (1, True)])
    r.chain([(blk_header(WZ, 0), False), (struct.pack("<QII", 16, 8, 1), False), (1, True)])
    mem = r.image()
    put("vhost_blk_request", "all-types", b"\x00" + mem)
    put("vhost_blk_request", "all-types-read-only", b"\x01" + mem)
    put("vhost_blk_request", "all-types-direct", b"\x02" + mem)
    r = Ring()
    # IN whose data and status share the last descriptor; OUT past the end of the disk.
    r.chain([(blk_header(IN, 8), False), (513, True)])
    r.chain([(blk_header(OUT, 63), False), (b"\x00" * 1024, False), (1, True)])
    put("vhost_blk_request", "edges", b"\x02" + r.image())


def vsock_header(op, src_port, dst_port, length=0, flags=0, src_cid=3, dst_cid=2):
    return struct.pack("<QQIIIHHIII", src_cid, dst_cid, src_port, dst_port, length,
                       1, op, flags, 256 << 10, 0)


def vsock_seeds():
    REQUEST, RESPONSE, RST, SHUTDOWN, RW, CREDIT_UPDATE, CREDIT_REQUEST = range(1, 8)
    r = Ring()
    r.chain([(vsock_header(REQUEST, 5000, 1024), False)])
    payload = b"hello from the guest\n"
    r.chain([(vsock_header(RW, 5000, 1024, len(payload)), False), (payload, False)])
    r.chain([(vsock_header(CREDIT_REQUEST, 5000, 1024), False)])
    r.chain([(vsock_header(CREDIT_UPDATE, 5000, 1024), False)])
    r.chain([(vsock_header(SHUTDOWN, 5000, 1024, flags=3), False)])
    r.chain([(vsock_header(REQUEST, 5001, 9999), False)])
    r.chain([(vsock_header(RST, 5001, 9999), False)])
    r.chain([(vsock_header(RW, 5002, 1024, 8), False)])
    put("vsock_packet", "session", b"\x10\x01" + r.image())
    r = Ring()
    r.chain([(vsock_header(REQUEST, 6000, 1024), False)])
    r.chain([(vsock_header(RESPONSE, 6000, 1024), False)])
    r.chain([(vsock_header(REQUEST, 6000, 1024, src_cid=4), False)])
    r.chain([(vsock_header(RW, 6000, 1024, 4)[:20], False), (vsock_header(RW, 6000, 1024, 4)[20:] + b"data", False)])
    put("vsock_packet", "odd", b"\x00\x04" + r.image())


# ---- agent protocol ---------------------------------------------------------------
def frame(kind, payload):
    return struct.pack("<I", len(payload) + 1) + bytes([kind]) + payload


def control(msg):
    return frame(0, json.dumps(msg, separators=(",", ":")).encode())


def agent_seeds():
    hello = control({"type": "hello", "version": 1, "agent": "0.1.0", "cid": 3})
    host = b"".join([
        control({"type": "hello", "version": 1}),
        control({"type": "exec", "argv": ["sh", "-c", "echo hi"], "env": [["A", "b"]],
                 "cwd": "/", "user": "root", "tty": {"rows": 24, "cols": 80}}),
        frame(1, b"stdin bytes"),
        control({"type": "close_stdin"}),
        control({"type": "signal", "signal": 15}),
        control({"type": "resize", "rows": 50, "cols": 132}),
        control({"type": "put_secrets", "names": ["token"]}),
        frame(4, b"s3cret"),
        control({"type": "prepare_snapshot"}),
        control({"type": "set_identity", "hostname": "ws", "machine_id": "0" * 32,
                 "entropy": [1, 2, 3], "mac": "52:54:00:12:34:56"}),
        control({"type": "write_file", "path": "/etc/motd", "mode": 420}),
        frame(5, b"file contents"),
        frame(5, b""),
        control({"type": "read_file", "path": "/etc/motd"}),
        control({"type": "shutdown"}),
    ])
    put("agent_frames", "host-messages", b"\x00" + host)
    agent = b"".join([
        hello,
        control({"type": "started", "pid": 42}),
        frame(2, b"out"),
        frame(3, b"err"),
        control({"type": "exited", "code": 0, "signal": None}),
        control({"type": "error", "code": "exec.not_found", "message": "no such file"}),
        control({"type": "shutting_down"}),
        control({"type": "done"}),
    ])
    put("agent_frames", "agent-messages", b"\x01" + agent)
    put("agent_frames", "client-exec", b"\x04" + hello + control({"type": "started", "pid": 7})
        + frame(2, b"hello\n") + frame(3, b"warn\n")
        + control({"type": "exited", "code": None, "signal": 9}))
    put("agent_frames", "client-read-file", b"\x05" + hello + frame(5, b"a" * 100)
        + frame(5, b"b" * 100) + frame(5, b"") + control({"type": "done"}))
    put("agent_frames", "client-shutdown", b"\x06" + hello + control({"type": "shutting_down"}))


# ---- device state -----------------------------------------------------------------
def container(kind, payload, major=1, minor=0):
    k = kind.encode().ljust(16, b"\0")
    return (b"MADEVST\0" + k + struct.pack("<HHI", major, minor, len(payload))
            + hashlib.sha256(payload).digest() + payload)


def device_state_seeds():
    blk = json.dumps({"acked_features": (1 << 32) | (1 << 9), "sectors": 2048,
                      "read_only": False, "queues": 2, "serial": "disk-7"},
                     separators=(",", ":")).encode()
    vsock = json.dumps({"guest_cid": 3, "acked_features": 1 << 32},
                       separators=(",", ":")).encode()
    net = json.dumps({"mac": [82, 84, 0, 18, 52, 86], "acked_features": (1 << 32) | (1 << 5)},
                     separators=(",", ":")).encode()
    put("device_state", "blk", b"\x00" + container("vhost-blk", blk))
    put("device_state", "net", b"\x02" + container("vhost-net", net))
    put("device_state", "blk-sealed", b"\x80" + blk)
    put("device_state", "vsock-sealed", b"\x81" + vsock)
    put("device_state", "net-sealed", b"\x82" + net)
    with open(os.path.join(HERE, "snapshot", "device-0.state"), "rb") as f:
        put("device_state", "vsock-real", b"\x01" + f.read())


# ---- snapshot files ---------------------------------------------------------------
def snapshot_seeds():
    with open(os.path.join(HERE, "snapshot", "manifest.json"), "rb") as f:
        manifest = f.read()
    with open(os.path.join(HERE, "snapshot", "state.json"), "rb") as f:
        state = f.read()
    # Port operations: (port selector, read/write, value): i8042 commands and UART use.
    ops = bytes([
        2, 1, 0x20, 1, 0, 0,       # read the command byte
        2, 1, 0x60, 1, 1, 0x47,    # write the command byte
        2, 1, 0xd2, 1, 1, 0x1c,    # write to the keyboard output buffer
        1, 0, 0,                   # read the data port
        2, 1, 0xfe,                # pulse reset
        0 | (3 << 2), 1, 0x80,     # UART LCR: DLAB on
        0, 1, 0x0c,                # divisor low
        0 | (3 << 2), 1, 0x03,     # LCR: 8N1
        0, 1, 0x41,                # transmit 'A'
        0 | (5 << 2), 0, 0,        # read LSR
    ])
    nops = len(ops) // 3
    body = struct.pack("<H", len(manifest)) + manifest + state
    put("snapshot_files", "real", b"\x00" + bytes([nops]) + ops + body)
    put("snapshot_files", "real-fixed", b"\x01" + bytes([nops]) + ops + body)


# ---- VMM control API --------------------------------------------------------------
def api_seeds():
    lines = b"".join([
        b'{"cmd":"status"}\n', b'{"cmd":"pause"}\n', b'{"cmd":"resume"}\n',
        b'{"cmd":"shutdown","timeout_ms":4294967296}\n', b'{"cmd":"shutdown"}\n',
        b'{"cmd":"snapshot","dir":"/tmp/snap"}\n', b'not json\n', b'{"cmd":"status"',
    ])
    put("vmm_api", "requests", b"\x07" + lines)
    put("vmm_api", "one-byte-reads", b"\x00" + lines)


# ---- OCI images -------------------------------------------------------------------
BASE = "/var/tmp/microagent-fuzz-image"


def tar_of(entries, fmt=tarfile.GNU_FORMAT):
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as t:
        for e in entries:
            info = tarfile.TarInfo(e["name"])
            info.mtime = 0
            info.mode = e.get("mode", 0o644)
            info.uid = e.get("uid", 0)
            info.gid = e.get("gid", 0)
            info.type = e.get("type", tarfile.REGTYPE)
            info.linkname = e.get("link", "")
            if "pax" in e:
                info.pax_headers = e["pax"]
            data = e.get("data", b"")
            info.size = len(data) if info.type == tarfile.REGTYPE else 0
            t.addfile(info, io.BytesIO(data) if info.size else None)
    return out.getvalue()


def built(entries):
    """The built-tar mode's entry encoding (fuzz_targets/image_layer.rs)."""
    kinds = {"file": 0, "dir": 1, "symlink": 2, "link": 3, "char": 4, "fifo": 5}
    out = b""
    for kind, name, link, mode, data in entries:
        data = data + b"\0" * (-len(data) % 4)
        out += bytes([kinds[kind], len(name)]) + name + bytes([len(link)]) + link
        out += bytes([mode, len(data) // 4]) + data
    return out


def image_seeds():
    D, S, L = tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE
    base = tar_of([
        {"name": "./", "type": D, "mode": 0o755},
        {"name": "bin/", "type": D, "mode": 0o755},
        {"name": "bin/busybox", "mode": 0o4755, "data": b"\x7fELF fake"},
        {"name": "bin/sh", "type": S, "link": "busybox"},
        {"name": "bin/ls", "type": L, "link": "bin/busybox"},
        {"name": "etc/passwd", "data": b"root:x:0:0::/root:/bin/sh\n", "uid": 0},
        {"name": "home/user/", "type": D, "mode": 0o700, "uid": 1000, "gid": 1000},
        {"name": "usr/bin/ping", "mode": 0o755, "data": b"ping",
         "pax": {"SCHILY.xattr.security.capability":
                 "\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"}},
    ], tarfile.PAX_FORMAT)
    put("image_layer", "base", b"\x00" + base)
    put("image_layer", "base-gzip", b"\x00" + gzip.compress(base, mtime=0))
    whiteouts = tar_of([
        {"name": "etc/.wh.passwd"},
        {"name": "home/.wh..wh..opq"},
        {"name": "home/new", "data": b"new"},
        {"name": "bin/.wh.sh"},
    ])
    put("image_layer", "whiteouts", b"\x00" + whiteouts)
    # Hostile entries the unpacker must refuse (each is its own layer: the first refusal
    # ends a layer).
    hostile = [
        [{"name": "../outside/escaped", "data": b"x"}],
        [{"name": BASE + "/outside/escaped", "data": b"x"}],
        [{"name": "up", "type": S, "link": "../outside"}, {"name": "up/escaped", "data": b"x"}],
        [{"name": "abs", "type": S, "link": BASE + "/outside"}, {"name": "abs/escaped", "data": b"x"}],
        [{"name": "hl", "type": L, "link": "../outside/sentinel"}],
        [{"name": "abs", "type": S, "link": BASE + "/outside/sentinel"}, {"name": "abs", "data": b"x"}],
        [{"name": "d/", "type": D}, {"name": "d/.wh..."}],
        [{"name": ".wh..."}],
    ]
    for i, entries in enumerate(hostile):
        put("image_layer", "hostile-%d" % i, b"\x00" + tar_of(entries))
    put("image_layer", "built", b"\x01" + built([
        ("dir", b"etc", b"", 0x4, b""),
        ("file", b"etc/hosts", b"", 0x40, b"127.0.0.1 localhost\n"),
        ("symlink", b"lnk", b"../outside", 0, b""),
        ("file", b"lnk/x", b"", 0, b"x"),
        ("link", b"hard", b"etc/hosts", 0, b""),
        ("file", b"etc/.wh.hosts", b"", 0, b""),
        ("fifo", b"fifo", b"", 0, b""),
    ]))
    put("image_layer", "built-absolute", b"\x01" + built([
        ("symlink", b"a", BASE.encode() + b"/outside", 0, b""),
        ("file", b"a/sentinel", b"", 0, b"changed"),
        ("link", b"b", BASE.encode() + b"/outside/sentinel", 0, b""),
    ]))
    config = {
        "architecture": "amd64", "os": "linux", "variant": "v1",
        "config": {"Env": ["PATH=/usr/bin:/bin", "NOVALUE", "A=b=c"], "Entrypoint": ["/bin/sh"],
                   "Cmd": ["-c", "echo hi"], "WorkingDir": "/root", "User": "1000:1000"},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "0" * 64]},
        "history": [{"created_by": "seed"}],
    }
    put("image_layer", "config", b"\x02" + json.dumps(config).encode())

# ---- guest frames into the user network (net_frames) ------------------------------
# Input: frames, each a little-endian u16 length and its bytes (fuzz_targets/net_frames.rs).
GUEST_MAC = bytes.fromhex("525400123456")
GW_MAC = bytes.fromhex("52550a000202")
GUEST_IP, GW_IP, DNS_IP = bytes([10, 0, 2, 15]), bytes([10, 0, 2, 2]), bytes([10, 0, 2, 3])


def csum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return (~total) & 0xFFFF


def eth(payload, kind=0x0800, dst=GW_MAC):
    return dst + GUEST_MAC + struct.pack("!H", kind) + payload


def ipv4(proto, payload, dst=GW_IP, options=b"", flags_frag=0x4000, total=None, good=True):
    ihl = 5 + len(options) // 4
    length = total if total is not None else 20 + len(options) + len(payload)
    head = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, length, 1, flags_frag, 64, proto, 0,
                       GUEST_IP, dst) + options
    c = csum(head) if good else 0xBEEF
    head = head[:10] + struct.pack("!H", c) + head[12:]
    return head + payload


def pseudo(proto, dst, seg):
    return GUEST_IP + dst + struct.pack("!BBH", 0, proto, len(seg))


def tcp(sport, dport, flags, seq=1000, ack=0, data=b"", dst=GW_IP, good=True):
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 65535, 0, 0) + data
    c = csum(pseudo(6, dst, seg) + seg) if good else 0x1234
    return seg[:16] + struct.pack("!H", c) + seg[18:]


def udp(sport, dport, data, dst=GW_IP, length=None):
    seg = struct.pack("!HHHH", sport, dport, length if length is not None else 8 + len(data), 0) + data
    return seg


def icmp_echo(data=b"microagent-ping"):
    msg = struct.pack("!BBHHH", 8, 0, 0, 0x1234, 1) + data
    return msg[:2] + struct.pack("!H", csum(msg)) + msg[4:]


def arp_request(target=GW_IP):
    return eth(struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + GUEST_MAC + GUEST_IP + b"\0" * 6 + target,
               kind=0x0806, dst=b"\xff" * 6)


def dhcp_discover():
    msg = struct.pack("!BBBBIHH", 1, 1, 6, 0, 0x12345678, 0, 0x8000) + b"\0" * 16
    msg += GUEST_MAC + b"\0" * 10 + b"\0" * 192 + bytes([99, 130, 83, 99])
    msg += bytes([53, 1, 1, 55, 3, 1, 3, 6, 255])
    return eth(ipv4(17, udp(68, 67, msg, dst=b"\xff" * 4), dst=b"\xff" * 4), dst=b"\xff" * 6)


def dns_query():
    q = struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0) + b"\x07example\x03com\x00" + struct.pack("!HH", 1, 1)
    return eth(ipv4(17, udp(40000, 53, q, dst=DNS_IP), dst=DNS_IP))


def frames(*fs):
    return b"".join(struct.pack("<H", len(f)) + f for f in fs)


def net_seeds():
    syn = eth(ipv4(6, tcp(40000, 8080, 0x02)))
    ack = eth(ipv4(6, tcp(40000, 8080, 0x10, seq=1001, ack=1)))
    data = eth(ipv4(6, tcp(40000, 8080, 0x18, seq=1001, ack=1, data=b"GET / HTTP/1.0\r\n\r\n")))
    fin = eth(ipv4(6, tcp(40000, 8080, 0x11, seq=1019, ack=1)))
    put("net_frames", "arp-ping", frames(arp_request(), eth(ipv4(1, icmp_echo()))))
    put("net_frames", "dhcp", frames(dhcp_discover()))
    put("net_frames", "dns", frames(dns_query()))
    put("net_frames", "tcp-flow", frames(arp_request(), syn, ack, data, fin))
    put("net_frames", "udp-gateway", frames(eth(ipv4(17, udp(40001, 5353, b"hello")))))
    put("net_frames", "truncated", frames(b"\x52\x55\x0a", eth(b"\x45\x00"), syn[:30], arp_request()[:20]))
    put("net_frames", "bad-lengths", frames(
        eth(ipv4(17, udp(40001, 5353, b"hello", length=4000))),
        eth(ipv4(17, udp(40001, 5353, b"hello", length=3))),
        eth(ipv4(1, icmp_echo(), total=9000)),
        eth(ipv4(1, icmp_echo(), total=10))))
    put("net_frames", "bad-checksums", frames(
        eth(ipv4(1, icmp_echo(), good=False)),
        eth(ipv4(6, tcp(40000, 8080, 0x02, good=False)))))
    put("net_frames", "ip-options", frames(
        eth(ipv4(1, icmp_echo(), options=b"\x94\x04\x00\x00")),
        eth(ipv4(6, tcp(40002, 8080, 0x02), options=b"\x01\x01\x01\x00"))))
    put("net_frames", "fragments", frames(
        eth(ipv4(1, icmp_echo(b"A" * 64), flags_frag=0x2000)),
        eth(ipv4(1, b"B" * 64, flags_frag=0x0008)),
        eth(ipv4(17, udp(40001, 5353, b"x" * 32), flags_frag=0x2000))))
    put("net_frames", "oversized", frames(eth(ipv4(1, icmp_echo(b"C" * 1600))), b"\xff" * 2000))
    put("net_frames", "elsewhere", frames(
        eth(ipv4(6, tcp(40003, 443, 0x02, dst=bytes([192, 0, 2, 1])), dst=bytes([192, 0, 2, 1]))),
        eth(ipv4(17, udp(40004, 9, b"x", dst=bytes([10, 0, 2, 77])), dst=bytes([10, 0, 2, 77]))),
        eth(b"\x86\xdd" * 20, kind=0x86DD)))


def main():
    blk_seeds()
    vsock_seeds()
    agent_seeds()
    device_state_seeds()
    snapshot_seeds()
    api_seeds()
    image_seeds()
    net_seeds()


if __name__ == "__main__":
    sys.exit(main())
