"""The server under load: the latency of one request, and the throughput of concurrent clients,
through ``/super_resolve`` (gradio_client) against a ``tsdsr-serve`` that this starts.

    .venv/bin/python bench/serve.py [--clients 8] [--requests 48] [-- SERVER FLAGS]

The server runs from ``.venv-serve`` with ``--model tiny --precision fp32`` and the flags after
``--``; every request sends ``--photo`` (a 128² photo: one size class, warmed up) under a name
of its own. Prints one table (bench/RESULTS.md, "Serving").
"""

from __future__ import annotations

import argparse
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gradio_client import Client, handle_file

ROOT = Path(__file__).parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=48, help="in all, over the clients")
    p.add_argument("--single", type=int, default=10, help="requests, one at a time")
    p.add_argument("--photo", type=Path, default=ROOT / "tests" / "data" / "astronaut.png")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("server_flags", nargs="*")
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = Path(tempfile.mkdtemp())
    log = tmp / "serve.log"
    cmd = [str(ROOT / ".venv-serve" / "bin" / "tsdsr-serve"), "--model", "tiny",
           "--precision", "fp32", "--port", str(port), "--warm-up", "128x128",
           "--max-batch-size", str(args.max_batch_size), *args.server_flags]
    server = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        tic = time.monotonic()
        while "serving on" not in log.read_text():
            if server.poll() is not None or time.monotonic() - tic > 1800:
                raise SystemExit(f"the server did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.2)
        url = f"http://127.0.0.1:{port}/"
        photos = []
        for i in range(max(args.requests, args.single)):
            photos.append(tmp / f"photo{i}.png")
            shutil.copy(args.photo, photos[-1])

        def request(client: Client, photo: Path) -> float:
            start = time.perf_counter()
            client.predict(handle_file(str(photo)), api_name="/super_resolve")
            return time.perf_counter() - start

        client = Client(url, download_files=str(tmp / "downloads"), verbose=False)
        request(client, photos[0])  # the page's first fetches, out of the timing
        calls_before = log.read_text().count("image(s) in one call")
        single = [request(client, photo) for photo in photos[:args.single]]
        single_calls = log.read_text().count("image(s) in one call") - calls_before
        calls_before += single_calls
        clients = [Client(url, download_files=str(tmp / f"downloads{c}"), verbose=False)
                   for c in range(args.clients)]
        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            latencies = list(pool.map(
                lambda i: request(clients[i % args.clients], photos[i]), range(args.requests)))
        wall = time.perf_counter() - start
        calls = log.read_text().count("image(s) in one call") - calls_before
    finally:
        server.terminate()
        server.wait(60)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"| clients | requests | median latency s | p90 latency s | images/s | device calls "
          f"| images per call |\n|---|---|---|---|---|---|---|\n"
          f"| 1 | {args.single} | {statistics.median(single):.2f} | "
          f"{statistics.quantiles(single, n=10)[-1]:.2f} | {args.single / sum(single):.2f} "
          f"| {single_calls} | {args.single / single_calls:.1f} |\n"
          f"| {args.clients} | {args.requests} | {statistics.median(latencies):.2f} | "
          f"{statistics.quantiles(latencies, n=10)[-1]:.2f} | {args.requests / wall:.2f} | "
          f"{calls} | {args.requests / calls:.1f} |")


if __name__ == "__main__":
    main()
