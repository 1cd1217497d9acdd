"""A moto S3 server on 127.0.0.1 with the AWS environment pointed at it, for tests that need a real S3 API."""
from __future__ import annotations

import contextlib
import logging
import os
import socket
from typing import Iterator


@contextlib.contextmanager
def moto_s3() -> Iterator[str]:
    """Start moto, set AWS_* (test credentials, AWS_ENDPOINT_URL) for this process and the Ray workers it
    starts afterwards, yield the endpoint; restore the environment and stop the server after."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per S3 request otherwise
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield env["AWS_ENDPOINT_URL"]
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
