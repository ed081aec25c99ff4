"""A real S3 endpoint on loopback for the demo and the tests (moto's threaded server: in-process, in-memory).

It speaks the S3 HTTP API, so everything above it (boto3, the storage layer, listing, ACLs for anonymous access) runs
exactly as against a cloud bucket. Never bound to anything but 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

# Credentials for the local server only: moto accepts any; boto3 refuses to sign without some.
LOCAL_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "dinocell-local", "AWS_SECRET_ACCESS_KEY": "dinocell-local"}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalS3Server:
    """Start/stop a moto S3 server on 127.0.0.1; `endpoint_url` is what clients use."""

    def __init__(self, port: int = 0):
        try:
            from moto.server import ThreadedMotoServer
        except ImportError as e:  # pragma: no cover - depends on the install
            raise RuntimeError("the local S3 server needs moto: pip install 'dinocell[dev]'") from e
        self.port = port or free_port()
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.endpoint_url = f"http://127.0.0.1:{self.port}"

    def start(self) -> "LocalS3Server":
        import logging

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per request otherwise
        for k, v in LOCAL_CREDENTIALS.items():
            os.environ.setdefault(k, v)
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()


@contextmanager
def local_s3_server(port: int = 0) -> Iterator[LocalS3Server]:
    server = LocalS3Server(port).start()
    try:
        yield server
    finally:
        server.stop()


def create_bucket(endpoint_url: str, bucket: str, public_read: bool = False) -> None:
    """Create a bucket on the local server (public-read ACL lets unsigned clients list and read it)."""
    import boto3

    s3 = boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket, **({"ACL": "public-read"} if public_read else {}))
