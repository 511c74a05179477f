"""Benchmark: a worker reading an audit's images from the blob store, one by one vs read ahead.

The worker hands the library its images as a lazy sequence (worker/runner.py ``BlobImages``)
that the library lists whole at validation. From an object store each image is a GET, a
round trip; ``BlobImages`` keeps ``PREFETCH`` reads in flight ahead of the consumer. This
stores ``--images`` images of ``--kib`` KiB in a bucket of a local S3 server (``moto_server``,
started here on 127.0.0.1) and in a local folder, then reads them back both ways, alternating,
best of ``--repeats``. Prints seconds and the ratio sequential / read-ahead. A real object
store's round trips are longer than a local server's: the ratio here is a floor.

    OMP_NUM_THREADS=1 python bench/blob_reads.py [--images 500] [--kib 24] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--kib", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import boto3

    from app.settings import Settings
    from app.storage.blobs import LocalBlobStore, open_blob_store
    from worker.runner import BlobImages

    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="bench",
                     aws_secret_access_key="bench").create_bucket(Bucket="cdi-bench")
        with tempfile.TemporaryDirectory() as tmp:
            s3 = open_blob_store(Settings(data_dir=tmp, blob_url="s3://cdi-bench/blobs", s3_endpoint_url=endpoint,
                                          aws_access_key_id="bench", aws_secret_access_key="bench",
                                          aws_region="us-east-1"))
            local = LocalBlobStore(Path(tmp) / "blobs")
            payloads = [os.urandom(args.kib * 1024) for _ in range(args.images)]
            rows = []
            for i, data in enumerate(payloads):
                rows.append((f"img-{i:05d}.png", s3.put_bytes(data)))
                local.put_bytes(data)
            print(f"{args.images} images of {args.kib} KiB; best of {args.repeats}")
            print(f"{'store':<8}{'one by one':>12}{'read ahead':>12}{'ratio':>8}")
            for name, store in (("local", local), ("s3", s3)):
                best = {"seq": float("inf"), "ahead": float("inf")}
                for _ in range(args.repeats):
                    start = time.perf_counter()
                    seq = [store.read(sha) for _, sha in rows]
                    best["seq"] = min(best["seq"], time.perf_counter() - start)
                    start = time.perf_counter()
                    ahead = [f.data for f in BlobImages(store, rows)]
                    best["ahead"] = min(best["ahead"], time.perf_counter() - start)
                    assert seq == ahead == payloads
                print(f"{name:<8}{best['seq']:>11.2f}s{best['ahead']:>11.2f}s{best['seq'] / best['ahead']:>7.1f}x")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
