"""Download throughput of the download service next to nginx.

One file (100 MiB by default) is served twice on loopback: by the download
service (``web.app``: token check, record lookup, download counting, then
sendfile) in a child process, and by nginx (Debian's ``/usr/sbin/nginx``,
``sendfile on``, one worker by default) from the very same blob file. ``curl``
fetches it with one client and with ``--parallel`` clients at once; each
figure is the median of ``--runs`` runs, in MiB/s (the parallel figure is the
aggregate: all bytes over the wall time of the slowest client).

Run from the repository root: ``python -m bench.download`` (or
``python bench/download.py``). ``--uvloop`` runs the service on uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

if not __package__:
    # Run as a file, this folder would come first on sys.path; put the
    # repository root there instead so that web/ and storage/ import.
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

MIB = 1024 * 1024
NGINX = "/usr/sbin/nginx"
CURL = "curl"


# --------------------------------------------------------------------------
# The service, run in a child process
# --------------------------------------------------------------------------


async def _serve(workdir: Path, data_file: Path) -> None:
    from aiohttp import web

    from storage.interfaces import LinkRecord
    from storage.local import LocalBlobStore
    from storage.sqlite import SqliteStateStore
    from web.app import WebOptions, build_app
    from web.links import LinkSigner, new_link_id

    blobs = LocalBlobStore(workdir / "blobs")
    state = await SqliteStateStore.open(workdir / "state.db")
    info = await blobs.put(await asyncio.to_thread(data_file.read_bytes))
    now = time.time()
    link_id = new_link_id()
    await state.add_links(
        [
            LinkRecord(
                link_id=link_id,
                blob_digest=info.digest,
                filename="bench.bin",
                content_type="application/octet-stream",
                size=info.size,
                sender="bench@example.com",
                message_id="<bench@example.com>",
                created=now,
                expires=now + 86_400,
            )
        ]
    )
    signer = LinkSigner(["bench-key"], max_age=86_400)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    app = build_app(state, blobs, signer, WebOptions(public_url=base))
    blob_path = blobs.local_path(info.digest)

    async def bare(request: web.Request) -> web.FileResponse:
        # aiohttp's own file serving with nothing around it, for comparison.
        return web.FileResponse(blob_path)

    app.router.add_get("/bare", bare)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock, backlog=1024).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    url = f"{base}/d/{signer.sign(link_id)}/file"
    print(json.dumps({"url": url, "bare_url": f"{base}/bare", "path": str(blob_path)}))
    sys.stdout.flush()
    await stop.wait()
    await runner.cleanup()
    await state.close()


def serve_main(workdir: Path, data_file: Path, use_uvloop: bool) -> None:
    if use_uvloop:
        import uvloop

        uvloop.run(_serve(workdir, data_file))
    else:
        asyncio.run(_serve(workdir, data_file))


# --------------------------------------------------------------------------
# Harness
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    name: str
    url: str
    path: Path | None = None  # the blob file, for the service
    bare_url: str | None = None  # the same file through a bare web.FileResponse


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, deadline: float) -> None:
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


NGINX_CONF = """\
daemon off;
user {user};
worker_processes {workers};
pid {tmp}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 30;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        location = /file {{
            alias {path};
            default_type application/octet-stream;
        }}
    }}
}}
"""


@contextlib.contextmanager
def run_service(workdir: Path, data_file: Path, use_uvloop: bool) -> Iterator[Server]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "serve", str(workdir), str(data_file)]
    if use_uvloop:
        cmd.append("--uvloop")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("the download service did not start")
        info = json.loads(line)
        name = "attachgate (uvloop)" if use_uvloop else "attachgate"
        yield Server(name, info["url"], Path(info["path"]), info["bare_url"])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def run_nginx(workdir: Path, blob_path: Path, workers: int) -> Iterator[Server]:
    tmp = workdir / "nginx"
    tmp.mkdir()
    port = free_port()
    conf = tmp / "nginx.conf"
    # The blob files are private to their owner (0600): nginx's workers must
    # run as that owner rather than as nginx's default unprivileged user.
    user = pwd.getpwuid(os.getuid()).pw_name
    conf.write_text(
        NGINX_CONF.format(user=user, workers=workers, tmp=tmp, port=port, path=blob_path)
    )
    proc = subprocess.Popen([NGINX, "-p", str(tmp), "-c", str(conf), "-e", "stderr"])
    try:
        wait_for_port(port, time.monotonic() + 10)
        yield Server(
            f"nginx ({workers} worker{'s' if workers > 1 else ''})", f"http://127.0.0.1:{port}/file"
        )
    finally:
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def curl_cmd(url: str) -> list[str]:
    return [CURL, "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download}", url]


def check(output: str, size: int) -> None:
    code, got = output.split()
    if code != "200" or int(got) != size:
        raise RuntimeError(f"bad download: HTTP {code}, {got} bytes of {size}")


def one_client(url: str, size: int) -> float:
    start = time.perf_counter()
    out = subprocess.run(curl_cmd(url), capture_output=True, text=True, check=True).stdout
    elapsed = time.perf_counter() - start
    check(out, size)
    return size / MIB / elapsed


def parallel_clients(url: str, size: int, clients: int) -> float:
    start = time.perf_counter()
    procs = [
        subprocess.Popen(curl_cmd(url), stdout=subprocess.PIPE, text=True) for _ in range(clients)
    ]
    outputs = [p.communicate()[0] for p in procs]
    elapsed = time.perf_counter() - start
    for out in outputs:
        check(out, size)
    return clients * size / MIB / elapsed


def measure(
    servers: list[Server], size: int, runs: int, clients: int
) -> list[tuple[str, float, float]]:
    """Medians per server; runs are interleaved so that a noisy neighbour
    slows every server alike instead of one of them."""
    for server in servers:
        one_client(server.url, size)  # warm-up: page cache, first connection
    singles: dict[str, list[float]] = {s.name: [] for s in servers}
    manys: dict[str, list[float]] = {s.name: [] for s in servers}
    for _ in range(runs):
        for server in servers:
            singles[server.name].append(one_client(server.url, size))
        for server in servers:
            manys[server.name].append(parallel_clients(server.url, size, clients))
    return [
        (s.name, statistics.median(singles[s.name]), statistics.median(manys[s.name]))
        for s in servers
    ]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "serve":
        serve_main(Path(args[1]), Path(args[2]), "--uvloop" in args[3:])
        return 0

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--parallel", type=int, default=20)
    parser.add_argument("--nginx-workers", type=int, default=1)
    parser.add_argument("--uvloop", action="store_true", help="also run the service on uvloop")
    parser.add_argument(
        "--bare", action="store_true", help="also measure a bare aiohttp FileResponse"
    )
    opts = parser.parse_args(args)
    for tool in (NGINX, CURL):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed", file=sys.stderr)
            return 2

    size = opts.size_mib * MIB
    with tempfile.TemporaryDirectory(prefix="attachgate-bench-") as tmp:
        workdir = Path(tmp)
        data_file = workdir / "data.bin"
        with data_file.open("wb") as out:
            for _ in range(opts.size_mib):
                out.write(os.urandom(MIB))
        with contextlib.ExitStack() as stack:
            servers: list[Server] = []
            for use_uvloop in [False, True] if opts.uvloop else [False]:
                service_dir = workdir / ("service-uvloop" if use_uvloop else "service")
                service_dir.mkdir()
                server = stack.enter_context(run_service(service_dir, data_file, use_uvloop))
                servers.append(server)
                if opts.bare and server.bare_url is not None:
                    suffix = server.name.removeprefix("attachgate")
                    servers.append(Server(f"bare FileResponse{suffix}", server.bare_url))
            blob_path = servers[0].path
            assert blob_path is not None
            servers.append(stack.enter_context(run_nginx(workdir, blob_path, opts.nginx_workers)))
            results = measure(servers, size, opts.runs, opts.parallel)

    print(f"{opts.size_mib} MiB file over loopback with curl, medians of {opts.runs} runs (MiB/s)")
    print(f"{'server':<24} {'1 client':>10} {f'{opts.parallel} parallel':>12}")
    for name, single, many in results:
        print(f"{name:<24} {single:>10.0f} {many:>12.0f}")
    nginx_single, nginx_many = results[-1][1], results[-1][2]
    for name, single, many in results[:-1]:
        print(
            f"ratio {name} / nginx: {single / nginx_single:.2f} (1 client), "
            f"{many / nginx_many:.2f} ({opts.parallel} parallel)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
