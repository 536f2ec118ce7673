"""A real S3-compatible server (moto's HTTP server, in a thread) and a TCP proxy that drops connections.

The proxy sits between the client (s3fs/botocore) and the server and resets connections once they have
passed `cut_after` bytes from server to client, so transfers are cut mid-body.
"""
from __future__ import annotations

import os
import socket
import struct
import threading

import pytest

KEY, SECRET, REGION = "testing", "testing", "us-east-1"


def s3_env(endpoint: str) -> dict:
    """The standard AWS variables a user sets to point any AWS client at an S3-compatible endpoint."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET,
            "AWS_DEFAULT_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true"}


class FlakyProxy:
    """TCP proxy 127.0.0.1:port -> upstream that resets connections after `cut_after` bytes downstream.

    Connections are counted in runs of `burst`; every `every`-th run is cut whole (moto's server answers one
    request per connection, so a run is `burst` responses in a row: an outage longer than the client
    library's own retries)."""

    def __init__(self, upstream_port: int, cut_after: int = 0, every: int = 1, burst: int = 1):
        self.upstream_port, self.cut_after, self.every, self.burst = upstream_port, cut_after, every, burst
        self.cuts = 0  # connections reset mid-transfer
        self.connections = 0
        self._lock = threading.Lock()
        self._srv = socket.socket()
        self._srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._srv.bind(("127.0.0.1", 0))
        self._srv.listen(64)
        self.port = self._srv.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                run = (self.connections - 1) // self.burst
                cut = self.cut_after if run % self.every == self.every - 1 else 0
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pipe, args=(client, upstream, 0), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, cut), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, cut_after: int):
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if cut_after and sent + len(data) > cut_after:
                    dst.sendall(data[:cut_after - sent])
                    with self._lock:
                        self.cuts += 1
                    break  # reset both ends below: the client sees the connection die mid-body
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            try:  # linger 0: close sends RST, not FIN; SHUT_RD wakes the other direction's recv
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RD)
            except OSError:
                pass
            s.close()

    def close(self):
        self._srv.close()


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on a free port; yields its endpoint URL. Credentials are any non-empty pair."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_bucket(endpoint: str, name: str) -> None:
    import boto3

    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=KEY, aws_secret_access_key=SECRET,
                 region_name=REGION).create_bucket(Bucket=name)


def set_env(monkeypatch, endpoint: str) -> None:
    for k, v in s3_env(endpoint).items():
        monkeypatch.setenv(k, v)
    os.environ.pop("AWS_PROFILE", None)
