"""Repositories on a real S3 server: Ceph's RADOS Gateway, started by the tests on 127.0.0.1.

Every repository verb over s3://, tampering with the stored objects, an outage of the gateway
during live-restore reads (they wait, no error, then recover), chunks fetched once.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dmrecover.engine.pseudovolume import PseudoVolume
from dmrecover.errors import CorruptChunk, RepositoryError, RepositoryUnavailable
from dmrecover.repository.backup import backup
from dmrecover.repository.repo import Repository
from dmrecover.repository.s3 import S3Storage, parse_s3_url
from dmrecover.repository.source import RepositorySource
from dmrecover.repository.verify import verify
from tests.helpers.ceph import CephCluster, ceph_available, running
from tests.helpers.cli import CliRunner
from tests.helpers.required import needs

MiB = 1 << 20
CS = 256 << 10
FAST = {"kdf": "scrypt", "n": 1 << 10, "r": 8, "p": 1}

pytestmark = needs(ceph_available(), "Ceph packages")


@pytest.fixture(scope="module")
def ceph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CephCluster]:
    with running(tmp_path_factory.mktemp("ceph")) as cluster:
        yield cluster


@pytest.fixture
def url(ceph: CephCluster) -> str:
    return f"s3://dmrecover-test/{uuid.uuid4().hex[:12]}/repo"


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(2 * MiB) + bytes(MiB) + b"some text " * (MiB // 10) + os.urandom(777)
    p = tmp_path / "src.img"
    p.write_bytes(data)
    return p, data


def test_every_verb_over_s3(url: str, image, tmp_path: Path, cli: CliRunner) -> None:
    src, data = image
    pw = tmp_path / "pw"
    pw.write_text("correct horse\n")
    p = ("--password-file", str(pw))
    rc, out, err = cli("repo", "init", url, *p)
    assert rc == 0 and "encryption: aes-256-gcm" in out, err
    rc, _, err = cli("repo", "init", url, *p)
    assert rc == 66 and "objects exist under that prefix" in cli.error_line(err)
    rc, out, err = cli("backup", str(src), "--repo", url, *p, "--chunk-size", "256K",
                       "--name", "vol")
    assert rc == 0, err
    bid = out.strip()
    # Deduplication across backups works on S3 too.
    rc, out, err = cli("backup", str(src), "--repo", url, *p, "--chunk-size", "256K",
                       "--name", "vol")
    assert rc == 0, err
    rc, out, _ = cli("list", "--repo", url, *p)
    assert rc == 0 and bid in out and "encryption aes-256-gcm" in out
    rc, out, _ = cli("verify", "--repo", url, *p)
    assert rc == 0 and "all chunks good" in out
    dest = tmp_path / "out.img"
    rc, _, err = cli("restore", "--repo", url, *p, bid, str(dest))
    assert rc == 0, err
    assert dest.read_bytes() == data
    # Not the random image itself: its first line is UTF-8 about 1 run in 200 (a newline
    # within its first bytes), and the check then met a wrong password instead.
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe" + data[:1000])
    rc, _, err = cli("list", "--repo", url, "--password-file", str(binary))
    assert rc == 66 and "is not UTF-8 text" in cli.error_line(err)
    pw.write_text("wrong horse\n")
    rc, _, err = cli("list", "--repo", url, *p)
    assert rc == 66 and "wrong password" in cli.error_line(err)
    # No lock object left behind by the writers.
    assert S3Storage(url).list("locks") == []


def test_plain_repository_and_missing_one(url: str, image, cli: CliRunner) -> None:
    src, _ = image
    assert cli("repo", "init", url, "--encryption", "none")[0] == 0
    assert cli("backup", str(src), "--repo", url, "--chunk-size", "256K")[0] == 0
    rc, out, _ = cli("list", "--repo", url)
    assert rc == 0 and "encryption none" in out
    rc, _, err = cli("list", "--repo", url + "-nothing-here")
    assert rc == 66 and "is not a dmrecover repository (no config.json)" in cli.error_line(err)


def test_tampered_and_swapped_chunks_on_s3(url: str, image, tmp_path: Path) -> None:
    src, data = image
    repo = Repository.init(url, password="pw", kdf=FAST)
    m = backup(src, repo, name="vol", chunk_size=CS)
    store = S3Storage(url)
    a, b = m.chunks[0], m.chunks[1]
    key_a, key_b = f"chunks/{a[:2]}/{a}", f"chunks/{b[:2]}/{b}"
    store.put_atomic(key_a, store.get(key_b))  # swapped
    blob = bytearray(store.get(key_b))
    blob[100] ^= 0xFF
    store.put_atomic(key_b, bytes(blob))  # tampered
    repo = Repository.open(url, password="pw")
    problems = verify(repo)
    assert len(problems) == 2 and all("tampered with or swapped" in p for p in problems)
    with pytest.raises(CorruptChunk, match="chunk 0 .* tampered"):
        repo.read_chunk(m, 0)
    assert repo.read_chunk(m, 2) == data[2 * CS:3 * CS]
    with pytest.raises(RepositoryError, match="wrong password"):
        Repository.open(url, password="not it")


def test_outage_mid_live_restore_waits_and_recovers(ceph: CephCluster, url: str, image,
                                                    tmp_path: Path) -> None:
    """The gateway stops while reads need unrestored chunks: the reads wait (no error), the
    gateway comes back, they return the right bytes; each chunk is fetched once."""
    src, data = image
    repo = Repository.init(url, password="pw", kdf=FAST)
    m = backup(src, repo, name="vol", chunk_size=CS)
    repo = Repository.open(url, password="pw")
    opened = repo.storage.gets  # config.json and the key file
    source = RepositorySource(repo, m)
    dest = tmp_path / "dest.img"
    dest.write_bytes(b"")
    os.truncate(dest, m.size)
    with PseudoVolume(source, dest, tmp_path / "state", fetch_deadline=300) as vol:
        assert vol.read(0, 4096) == data[:4096]
        gets_before = repo.storage.gets
        assert vol.read(0, CS) == data[:CS]  # already fetched: no GET
        assert repo.storage.gets == gets_before
        ceph.stop_rgw()
        results: dict[str, object] = {}

        def reader() -> None:
            try:
                results["data"] = vol.read(CS, 2 * CS)
            except BaseException as err:  # noqa: BLE001 - the test reports it
                results["error"] = err

        t = threading.Thread(target=reader)
        t.start()
        time.sleep(3)  # the outage: the read must still be waiting, not failed
        assert t.is_alive() and not results, results
        ceph.start_rgw()
        t.join(timeout=120)
        assert not t.is_alive()
        assert "error" not in results, results.get("error")
        assert results["data"] == data[CS:3 * CS]
        # Background restore finishes; every stored chunk fetched exactly once.
        vol.start_restore()
        assert vol.wait_restored(timeout=120)
        stored = sum(1 for d in m.chunks if d is not None)
        assert repo.storage.gets - opened == stored, (repo.storage.gets - opened, stored)
    assert dest.read_bytes() == data


def test_unreachable_endpoint_is_transient(url: str, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard: refused
    with pytest.raises(RepositoryUnavailable, match="S3 endpoint unreachable"):
        S3Storage(url).get("config.json")


def _all_objects(url: str) -> dict[str, bytes]:
    """Every object under the repository's prefix, with its bytes (boto3 directly)."""
    import boto3  # the server's view, not through the store under test

    bucket, prefix = parse_s3_url(url)
    client = boto3.client("s3")
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket,
                                                                 Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


def _rewrite_config(url: str, edit) -> None:
    store = S3Storage(url)
    cfg = json.loads(store.get("config.json"))
    edit(cfg)
    store.put_atomic("config.json", json.dumps(cfg).encode())


def test_format_1_repository_read_through_the_cli(url: str, image, tmp_path: Path,
                                                  cli: CliRunner) -> None:
    """A repository as the format-1 code wrote it (version 1, plain ids and manifests, no id,
    no encryption field, no keys) on S3: list says so, verify and restore work, and a
    backup into it adds to it. A newer format is refused in one line, nothing changed."""
    src, data = image
    assert cli("repo", "init", url, "--encryption", "none")[0] == 0
    rc, out, err = cli("backup", str(src), "--repo", url, "--chunk-size", "256K")
    assert rc == 0, err
    bid = out.strip()

    def to_v1(cfg: dict) -> None:
        for k in ("id", "encryption"):
            cfg.pop(k, None)
        cfg["version"] = 1
    _rewrite_config(url, to_v1)
    assert S3Storage(url).list("keys") == []
    rc, out, err = cli("list", "--repo", url)
    assert rc == 0 and bid in out and "format 1, encryption none" in out, err
    rc, out, err = cli("list", "--repo", url, "--json")
    assert rc == 0 and [b["encryption"] for b in json.loads(out)] == ["none"], err
    rc, out, err = cli("verify", "--repo", url)
    assert rc == 0 and "all chunks good" in out, err
    dest = tmp_path / "out.img"
    rc, _, err = cli("restore", "--repo", url, bid, str(dest))
    assert rc == 0, err
    assert dest.read_bytes() == data
    # A format from a newer dmrecover: refused in one line, nothing written.
    before = _all_objects(url)
    assert len(before) > 3

    def to_v3(cfg: dict) -> None:
        cfg["version"] = 3
    _rewrite_config(url, to_v3)
    for verb in (("list", "--repo", url), ("verify", "--repo", url),
                 ("restore", "--repo", url, bid, str(tmp_path / "again.img"))):
        rc, _, err = cli(*verb)
        line = cli.error_line(err)
        assert rc == 66 and "unsupported format version 3" in line, (verb, line)
    assert not (tmp_path / "again.img").exists()
    after = _all_objects(url)
    assert after.keys() == before.keys()
    assert all(after[k] == before[k] for k in before if not k.endswith("/config.json"))
