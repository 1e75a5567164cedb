#!/usr/bin/env python3
# imds-proxy.py - the guest's only way to the EC2 instance metadata: a filtering proxy.
#
# Usage:
#   imds-proxy.py [--upstream tcp:HOST:PORT | --upstream unix:@NAME --upstream-uid UID] [--timeout S]
#   imds-proxy.py --gate NAME --vm-uid UID --parent PID [--imds HOST:PORT] [--timeout S]
#
# Proxy mode (the default) serves ONE HTTP request read from stdin and answers
# on stdout: QEMU's user network runs it for each guest connection to
# 10.0.2.100:8173 (run-vm.sh's guestfwd=...-cmd:), with the guest's socket as
# stdin, stdout and stderr. So nothing but the HTTP answer is ever written:
# stderr is sent to /dev/null first. It serves only GET of /latest/user-data
# and of the non-credential /latest/meta-data keys in META_KEYS; everything
# else (meta-data/iam/, identity-credentials/, /latest/api/token, dynamic/,
# listings, queries, any other method or path) gets 403 and is never sent
# upstream. For an allowed path it takes an IMDSv2 token itself (PUT
# /latest/api/token, 60 s), then GETs the path with it; the guest's own headers
# are dropped (the guest needs no token). An upstream that refuses the token
# (403/404/405: IMDSv1 only) is asked without one.
#   --upstream tcp:HOST:PORT   the metadata service (default tcp:169.254.169.254:80)
#   --upstream unix:@NAME      the gate's abstract unix socket (when QEMU runs as
#                              an unprivileged user the host's firewall keeps that
#                              user away from 169.254.0.0/16: see run-vm.sh)
#   --upstream-uid UID         with unix:, the uid the gate must run as (checked
#                              with SO_PEERCRED, so no other process can pose as it)
#
# Gate mode runs beside QEMU, started by run-vm.sh (as another user than
# QEMU's), and relays the proxy's requests to the metadata service: it listens
# on the abstract unix socket @NAME, accepts only connections from processes of
# uid --vm-uid, and forwards only the token PUT and the proxy's allowed GETs
# (so even a process that took over QEMU gets no credential). It prints
# "ready" on stdout once it listens, logs one line per request on stderr
# ("imds-gate: GET /latest/user-data -> 200"), serves at most 16 requests at
# once, and exits when its parent (QEMU: run-vm.sh execs it) is gone.
#   --imds HOST:PORT   the metadata service (default 169.254.169.254:80)
#
# --timeout S bounds each request (default 10 s; proxy mode: the whole run).
# Needs only Python 3.8+'s standard library (run as python3 -I -S).
#
# Exit: proxy mode 0 once an answer was written (whatever its HTTP status), 1
#   when the guest went away or the bound passed; gate mode 0 when its parent is
#   gone or on SIGTERM, 1 when the socket cannot be bound; 2 bad arguments.

import os
import re
import select
import signal
import socket
import struct
import sys
import threading
import time

IMDS = ("169.254.169.254", 80)
TOKEN_PATH = "/latest/api/token"
TOKEN_TTL = "60"
USER_DATA = "/latest/user-data"
# What a buildlet or an SDK asks about its instance; nothing that grants access.
META_KEYS = frozenset(
    [
        "ami-id",
        "ami-launch-index",
        "hostname",
        "instance-id",
        "instance-life-cycle",
        "instance-type",
        "local-hostname",
        "local-ipv4",
        "mac",
        "placement/availability-zone",
        "placement/availability-zone-id",
        "placement/region",
        "public-hostname",
        "public-ipv4",
        "reservation-id",
        "services/domain",
        "services/partition",
    ]
)
MAX_HEAD = 8192
MAX_BODY = 1 << 20
MAX_CONNECTIONS = 16  # the gate's requests under way at once
TOKEN_RE = re.compile(r"[A-Za-z0-9_=+/.-]{1,512}")
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 502: "Bad Gateway", 504: "Gateway Timeout"}  # fmt: skip


def allowed_get(target):
    """True when TARGET (a request path) is one the guest may read."""
    if target == USER_DATA:
        return True
    prefix = "/latest/meta-data/"
    return target.startswith(prefix) and target[len(prefix) :] in META_KEYS


class Deadline:
    def __init__(self, seconds):
        self.end = time.monotonic() + seconds

    def left(self):
        return max(0.0, self.end - time.monotonic())


def read_head(read, deadline):
    """Bytes up to the blank line after the headers, via read(timeout); None when
    the peer closed, sent more than MAX_HEAD or the deadline passed."""
    buf = b""
    while b"\r\n\r\n" not in buf and b"\n\n" not in buf:
        if len(buf) > MAX_HEAD or deadline.left() <= 0:
            return None
        chunk = read(deadline.left())
        if not chunk:
            return None
        buf += chunk
    return buf


def parse_request(head):
    """(method, target, {lower-case header: value}) of a request head; None when malformed."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        return None
    lines = text.replace("\r\n", "\n").split("\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or parts[2] not in ("HTTP/1.0", "HTTP/1.1") or not re.fullmatch(r"[A-Z]{1,10}", parts[0]):
        return None
    headers = {}
    for line in lines[1:]:
        if not line:
            break
        name, sep, value = line.partition(":")
        if not sep or not re.fullmatch(r"[A-Za-z0-9-]{1,64}", name):
            return None
        headers[name.lower()] = value.strip()
    return parts[0], parts[1], headers


def response(status, body=b"", ctype="text/plain"):
    head = "HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % (
        status, REASONS.get(status, "Status"), ctype, len(body))  # fmt: skip
    return head.encode("ascii") + body


def refusal(status, why):
    return response(status, ("%s (the host's metadata proxy)\n" % why).encode("ascii"))


def parse_response(raw):
    """(status, content type, body) of an HTTP response; None when malformed."""
    sep = raw.find(b"\r\n\r\n")
    if sep < 0:
        return None
    lines = raw[:sep].decode("latin-1").split("\r\n")
    m = re.fullmatch(r"HTTP/1\.[01] (\d{3})(?: .*)?", lines[0])
    if not m:
        return None
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = raw[sep + 4 :]
    length = headers.get("content-length", "")
    if length.isdigit():
        body = body[: int(length)]
    ctype = headers.get("content-type", "text/plain")
    if not re.fullmatch(r"[A-Za-z0-9!#$&^_.+/=; -]{1,100}", ctype):
        ctype = "application/octet-stream"
    return int(m.group(1)), ctype, body


def recv_all(sock, deadline, limit):
    """Everything the peer sends until it closes (at most LIMIT bytes); None on timeout or overflow."""
    data = b""
    while True:
        if deadline.left() <= 0:
            return None
        sock.settimeout(deadline.left())
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            return None
        if not chunk:
            return data
        data += chunk
        if len(data) > limit:
            return None


def peer_uid(sock):
    _pid, uid, _gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return uid


# --- proxy mode ------------------------------------------------------------------


def connect_upstream(upstream, upstream_uid, deadline):
    kind, _, where = upstream.partition(":")
    if kind == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(deadline.left())
        sock.connect("\0" + where[1:] if where.startswith("@") else where)
        if upstream_uid is not None and peer_uid(sock) != upstream_uid:
            sock.close()
            raise OSError("the gate socket is not served by uid %d" % upstream_uid)
        return sock
    host, _, port = where.rpartition(":")
    return socket.create_connection((host, int(port)), timeout=deadline.left())


def ask(upstream, upstream_uid, request, deadline):
    sock = connect_upstream(upstream, upstream_uid, deadline)
    try:
        sock.sendall(request)
        raw = recv_all(sock, deadline, MAX_BODY + MAX_HEAD)
    finally:
        sock.close()
    if raw is None:
        raise TimeoutError("no complete answer from the metadata service in time")
    parsed = parse_response(raw)
    if parsed is None:
        raise OSError("the metadata service's answer is not HTTP")
    return parsed


def http_request(method, path, headers):
    lines = ["%s %s HTTP/1.1" % (method, path), "Host: %s" % IMDS[0]]
    lines += ["%s: %s" % kv for kv in headers]
    lines += ["Connection: close", "", ""]
    return "\r\n".join(lines).encode("ascii")


def proxy(upstream, upstream_uid, timeout):
    deadline = Deadline(timeout)
    inp, out = sys.stdin.fileno(), sys.stdout.fileno()
    answered = [False]

    def write(data):
        answered[0] = True
        view = memoryview(data)
        while view:
            n = os.write(out, view)
            view = view[n:]

    def on_alarm(_sig, _frame):
        if not answered[0]:
            try:
                write(refusal(504, "no answer in time"))
            except OSError:
                pass
        os._exit(1)

    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(timeout) + 1)

    def read(wait):
        ready, _, _ = select.select([inp], [], [], wait)
        return os.read(inp, 4096) if ready else None

    head = read_head(read, deadline)
    if head is None:
        return 1
    req = parse_request(head)
    if req is None:
        write(refusal(400, "malformed request"))
        return 0
    method, target, _headers = req
    if method != "GET" or not allowed_get(target):
        write(refusal(403, "forbidden"))
        return 0
    try:
        status, _, token = ask(
            upstream, upstream_uid, http_request("PUT", TOKEN_PATH,
            [("X-aws-ec2-metadata-token-ttl-seconds", TOKEN_TTL), ("Content-Length", "0")]), deadline)  # fmt: skip
        headers = []
        if status == 200 and TOKEN_RE.fullmatch(token.decode("latin-1").strip()):
            headers.append(("X-aws-ec2-metadata-token", token.decode("latin-1").strip()))
        elif status not in (403, 404, 405):
            write(refusal(502, "the metadata service refused a token (HTTP %d)" % status))
            return 0
        status, ctype, body = ask(upstream, upstream_uid, http_request("GET", target, headers), deadline)
    except (OSError, ValueError) as e:
        write(refusal(504 if isinstance(e, (TimeoutError, socket.timeout)) else 502, "metadata service unreachable"))
        return 0
    write(response(status, body, ctype))
    return 0


# --- gate mode ---------------------------------------------------------------------


def log(msg):
    try:
        sys.stderr.write("imds-gate: %s\n" % msg)
        sys.stderr.flush()
    except OSError:
        pass


def gate_forward(req):
    """The request to send to the metadata service for REQ, or None when it is refused."""
    method, target, headers = req
    if method == "PUT" and target == TOKEN_PATH:
        ttl = headers.get("x-aws-ec2-metadata-token-ttl-seconds", "")
        if not re.fullmatch(r"[0-9]{1,5}", ttl) or not 1 <= int(ttl) <= 21600:
            return None
        return http_request("PUT", TOKEN_PATH,
                            [("X-aws-ec2-metadata-token-ttl-seconds", ttl), ("Content-Length", "0")])  # fmt: skip
    if method == "GET" and allowed_get(target):
        token = headers.get("x-aws-ec2-metadata-token")
        if token is not None and not TOKEN_RE.fullmatch(token):
            return None
        return http_request("GET", target, [("X-aws-ec2-metadata-token", token)] if token else [])
    return None


def gate_handle(conn, vm_uid, imds, timeout, slots):
    deadline = Deadline(timeout)
    try:
        uid = peer_uid(conn)
        if uid != vm_uid:
            log("refused a connection from uid %d (only uid %d may ask)" % (uid, vm_uid))
            return

        def read(wait):
            conn.settimeout(max(wait, 0.001))
            try:
                return conn.recv(4096)
            except socket.timeout:
                return None

        head = read_head(read, deadline)
        req = parse_request(head) if head else None
        forward = gate_forward(req) if req else None
        if forward is None:
            what = "%s %s" % (req[0], req[1][:120]) if req else "a malformed request"
            log("refused %s" % what)
            conn.sendall(refusal(403, "forbidden"))
            return
        up = socket.create_connection(imds, timeout=deadline.left())
        try:
            up.sendall(forward)
            raw = recv_all(up, deadline, MAX_BODY + MAX_HEAD)
        finally:
            up.close()
        if raw is None:
            log("%s %s -> no answer in time" % (req[0], req[1]))
            conn.sendall(refusal(504, "no answer in time"))
            return
        status = raw[9:12].decode("latin-1", "replace")
        log("%s %s -> %s" % (req[0], req[1], status))
        conn.sendall(raw)
    except OSError as e:
        log("request failed: %s" % e)
    finally:
        conn.close()
        slots.release()


def gate(name, vm_uid, parent, imds, timeout):
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        srv.bind("\0" + name)
    except OSError as e:
        log("cannot listen on @%s: %s" % (name, e))
        return 1
    srv.listen(16)
    signal.signal(signal.SIGTERM, lambda _s, _f: os._exit(0))
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    log("relaying uid %d's metadata requests from @%s to %s:%d" % (vm_uid, name, imds[0], imds[1]))
    slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
    while os.getppid() == parent:
        ready, _, _ = select.select([srv], [], [], 0.5)
        if not ready:
            continue
        conn, _ = srv.accept()
        if not slots.acquire(blocking=False):
            log("refused a connection: %d requests already under way" % MAX_CONNECTIONS)
            conn.close()
            continue
        threading.Thread(target=gate_handle, args=(conn, vm_uid, imds, timeout, slots), daemon=True).start()
    log("QEMU (pid %d) is gone: stopping" % parent)
    return 0


# --- arguments ----------------------------------------------------------------------


def usage(msg):
    sys.stderr.write("imds-proxy: %s\n" % msg)
    sys.stderr.write("usage: imds-proxy.py [--upstream tcp:HOST:PORT|unix:@NAME [--upstream-uid UID]] [--timeout S]\n"
                     "       imds-proxy.py --gate NAME --vm-uid UID --parent PID [--imds HOST:PORT] [--timeout S]\n")  # fmt: skip
    return 2


def host_port(value):
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("'%s' is not HOST:PORT" % value)
    return host, int(port)


def main(argv):
    opts = {}
    names = ("--upstream", "--upstream-uid", "--timeout", "--gate", "--vm-uid", "--parent", "--imds")
    args = list(argv)
    while args:
        name = args.pop(0)
        if name not in names or not args:
            return usage("unknown option or missing value: '%s'" % name)
        opts[name] = args.pop(0)
    try:
        timeout = float(opts.get("--timeout", "10"))
        if not 0 < timeout <= 300:
            raise ValueError("--timeout must be 0 to 300 seconds")
        if "--gate" in opts:
            if not re.fullmatch(r"[A-Za-z0-9._-]{1,100}", opts["--gate"]):
                raise ValueError("--gate NAME may hold letters, digits, '.', '_' and '-'")
            if "--vm-uid" not in opts or "--parent" not in opts:
                raise ValueError("--gate needs --vm-uid and --parent")
            imds = host_port(opts.get("--imds", "%s:%d" % IMDS))
            return gate(opts["--gate"], int(opts["--vm-uid"]), int(opts["--parent"]), imds, timeout)
        upstream = opts.get("--upstream", "tcp:%s:%d" % IMDS)
        if upstream.startswith("tcp:"):
            host_port(upstream[4:])
        elif not re.fullmatch(r"unix:@?[A-Za-z0-9._/-]{1,100}", upstream):
            raise ValueError("--upstream must be tcp:HOST:PORT or unix:@NAME")
        upstream_uid = int(opts["--upstream-uid"]) if "--upstream-uid" in opts else None
    except ValueError as e:
        return usage(str(e))
    # The guest reads stderr too: nothing may reach it but the HTTP answer.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stderr.fileno())
    try:
        return proxy(upstream, upstream_uid, timeout)
    except Exception:  # noqa: BLE001 - never a traceback into the guest's stream
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
