"""A private redis-server for the tests that need one (started by the test
suite itself, on a free loopback port, so it is isolated and also runs on a
newcomer's machine)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers.gw import free_port


def start_redis(workdir: Path) -> tuple[subprocess.Popen[str], str]:
    """Start a private redis-server on a free loopback port; wait until ready."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed: the Redis backend cannot be tested")
    for _ in range(5):
        port = free_port()
        server = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert server.stdout is not None
        for line in server.stdout:  # readiness comes from the server's own log
            if "Ready to accept connections" in line:
                return server, f"redis://127.0.0.1:{port}/0"
        server.wait()  # the port was taken meanwhile: try another
        server.stdout.close()
    pytest.fail("redis-server did not start on any free port")


def stop_redis(server: subprocess.Popen[str]) -> None:
    server.terminate()
    server.wait()
    if server.stdout is not None:
        server.stdout.close()
