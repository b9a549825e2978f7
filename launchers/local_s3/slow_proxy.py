"""A TCP proxy that makes the local S3 server behave like a distant bucket: every request waits --delay-ms
before it reaches the server, and each connection's responses flow at most --rate bytes per second. For
benchmarks (a bucket 50 ms away) and fault drills (a download slow enough to be killed midway).

    python launchers/local_s3/slow_proxy.py --to 127.0.0.1:8333 --delay-ms 50 [--rate 2MB] [--port 0]

It prints `listening on http://127.0.0.1:PORT` once it accepts connections: point S3_ENDPOINT_URL there. The
standard library only; it stops on SIGTERM or SIGINT. A request is what the client sends after the server
last spoke (HTTP/1.1, one request at a time per connection, as boto3 and streaming's downloader use it).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import signal
import socket
import sys
import threading
import time

UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def rate(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rate such as 2MB or 500KiB (bytes per second)")
    return int(float(m.group(1)) * UNITS[m.group(2).upper()])


class Connection:
    """One client connection and its own connection to the server, piped both ways by two threads."""

    def __init__(self, client: socket.socket, target: tuple[str, int], delay_s: float, rate: int):
        self.client, self.server = client, socket.create_connection(target)
        self.delay_s, self.rate = delay_s, rate
        self.server_spoke_last = True  # the next bytes from the client start a request
        self.ends = 0
        self.lock = threading.Lock()
        threading.Thread(target=self.pipe, args=(self.client, self.server, True), daemon=True).start()
        threading.Thread(target=self.pipe, args=(self.server, self.client, False), daemon=True).start()

    def pipe(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        piece = 16384 if self.rate else 65536
        try:
            while data := src.recv(piece):
                if upstream:
                    if self.server_spoke_last and self.delay_s:
                        time.sleep(self.delay_s)  # the request's way to a distant server
                    self.server_spoke_last = False
                else:
                    self.server_spoke_last = True
                dst.sendall(data)
                if not upstream and self.rate:
                    time.sleep(len(data) / self.rate)
        except OSError:
            pass  # a side closed or reset: end this direction
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
        with self.lock:
            self.ends += 1
            if self.ends == 2:
                self.client.close()
                self.server.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--to", default="127.0.0.1:8333", help="the server, HOST:PORT (default: the local S3 gateway)")
    ap.add_argument("--port", type=int, default=0, help="where to listen on 127.0.0.1 (0: a free port)")
    ap.add_argument("--delay-ms", type=float, default=50.0, help="added before each request reaches the server")
    ap.add_argument("--rate", type=rate, default=0, help="bytes per second per connection, e.g. 2MB (0: no limit)")
    args = ap.parse_args()
    host, _, port = args.to.rpartition(":")
    target = (host or "127.0.0.1", int(port))
    listener = socket.create_server(("127.0.0.1", args.port))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"listening on http://127.0.0.1:{listener.getsockname()[1]}", flush=True)
    try:
        while True:
            client, _ = listener.accept()
            try:
                Connection(client, target, args.delay_ms / 1000, args.rate)
            except OSError as e:  # the server is down: the client sees a reset, as it would from a real one
                print(f"cannot reach {args.to}: {e.strerror}", file=sys.stderr, flush=True)
                client.close()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
