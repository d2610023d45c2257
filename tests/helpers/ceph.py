"""A real single-node Ceph cluster with the RADOS Gateway on 127.0.0.1, for the S3 tests.

One monitor, one OSD (memstore: small test data, fastest; bluestore on a sparse file for
benchmarks that store GiBs, `store="bluestore"`) and radosgw, from Debian 12's
packages (ceph-mon ceph-osd radosgw ceph-common), all files in one directory, started in ~2-3 s
and stopped by their pid files (radosgw first: without RADOS it ignores SIGTERM for 120 s).
Recipe: ../shared/CEPH.md. `stop_rgw()`/`start_rgw()` simulate an outage of the S3 endpoint.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ACCESS_KEY = "DMRECOVERTESTKEY0001"
SECRET_KEY = "dmrecover-test-secret-key-0000000000001"
RGW_NAME = "client.rgw.test"


def ceph_available() -> bool:
    return all(shutil.which(t) for t in ("ceph-mon", "ceph-osd", "radosgw", "ceph",
                                         "monmaptool", "ceph-authtool", "radosgw-admin"))


def _free_port() -> int:
    # Outside 6800-7300, where the OSD picks its ports.
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not 6700 <= port <= 7400:
            return port


class CephCluster:
    """mon + osd + rgw under `root`; `endpoint` is the S3 URL once started."""

    def __init__(self, root: Path, *, store: str = "memstore",
                 bluestore_size: int = 16 << 30) -> None:
        if store not in ("memstore", "bluestore"):
            raise ValueError(f"store must be memstore or bluestore, not {store!r}")
        self.root = root
        self.store = store
        self.bluestore_size = bluestore_size
        self.conf = root / "ceph.conf"
        self.mon_port = _free_port()
        self.rgw_port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.rgw_port}"
        self.fsid = str(uuid.uuid4())

    # -- helpers

    def _run(self, *argv: str, timeout: float = 60) -> str:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): "
                               f"{proc.stderr.strip()[-2000:]}\n{self.log_tails()}")
        return proc.stdout

    def log_tails(self) -> str:
        out = []
        for log in sorted((self.root / "log").glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-15:]
            out.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def env(self) -> dict[str, str]:
        """The AWS variables that point boto3 at this gateway."""
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def _write_conf(self) -> None:
        r = self.root
        if self.store == "bluestore":
            # A sparse block file in osd_data (never bluestore_block_path to it: ELOOP).
            objectstore = f"""osd_objectstore = bluestore
bluestore_block_create = true
bluestore_block_size = {self.bluestore_size}
bdev_aio_poll_ms = 10"""
        else:
            objectstore = """osd_objectstore = memstore
memstore_device_bytes = 2147483648"""
        conf = f"""[global]
fsid = {self.fsid}
mon_host = [v2:127.0.0.1:{self.mon_port}]
public_addr = 127.0.0.1
cluster_addr = 127.0.0.1
ms_bind_msgr1 = false
ms_bind_ipv6 = false
auth_cluster_required = cephx
auth_service_required = cephx
auth_client_required = cephx
keyring = {r}/keyring
run_dir = {r}/run
admin_socket = {r}/run/$name.asok
pid_file = {r}/run/$name.pid
log_file = {r}/log/$name.log
mon_cluster_log_file = {r}/log/cluster.log
crash_dir = {r}/crash
err_to_stderr = false
log_to_stderr = false
osd_pool_default_size = 1
osd_pool_default_min_size = 1
mon_allow_pool_size_one = true
mon_warn_on_pool_no_redundancy = false
mon_warn_on_insecure_global_id_reclaim = false
mon_warn_on_insecure_global_id_reclaim_allowed = false
mon_data_avail_warn = 1
mon_data_avail_crit = 0
osd_crush_chooseleaf_type = 0
osd_pool_default_pg_num = 8
osd_pool_default_pgp_num = 8
osd_pool_default_pg_autoscale_mode = off
mon_max_pg_per_osd = 1000
paxos_propose_interval = 0.1
osd_fast_shutdown_notify_mon = false

[mon]
mon_data = {r}/mon/$cluster-$id

[osd]
osd_data = {r}/osd/$cluster-$id
{objectstore}
osd_max_object_size = 134217728

[{RGW_NAME}]
rgw_data = {r}/rgw
rgw_frontends = beast endpoint=127.0.0.1:{self.rgw_port}
rgw_dns_name = 127.0.0.1
"""
        self.conf.write_text(conf)

    # -- start / stop

    def start(self) -> None:
        r = self.root
        for d in ("run", "log", "crash", "mon", "osd/ceph-0", "rgw"):
            (r / d).mkdir(parents=True, exist_ok=True)
        self._write_conf()
        kr = str(r / "keyring")
        self._run("ceph-authtool", "--create-keyring", kr, "--gen-key", "-n", "mon.",
                  "--cap", "mon", "allow *")
        self._run("ceph-authtool", kr, "--gen-key", "-n", "client.admin", "--cap", "mon",
                  "allow *", "--cap", "osd", "allow *", "--cap", "mds", "allow *",
                  "--cap", "mgr", "allow *")
        self._run("ceph-authtool", kr, "--gen-key", "-n", "osd.0", "--cap", "mon",
                  "allow profile osd", "--cap", "osd", "allow *", "--cap", "mgr",
                  "allow profile osd")
        self._run("ceph-authtool", kr, "--gen-key", "-n", RGW_NAME, "--cap", "mon",
                  "allow rw", "--cap", "osd", "allow rwx")
        monmap = str(r / "monmap")
        self._run("monmaptool", "--create", "--fsid", self.fsid, "--addv", "a",
                  f"[v2:127.0.0.1:{self.mon_port}]", monmap)
        self._run("ceph-mon", "-c", str(self.conf), "--mkfs", "-i", "a", "--monmap", monmap,
                  "--keyring", kr)
        self._run("ceph-mon", "-c", str(self.conf), "-i", "a")
        osd_uuid = str(uuid.uuid4())
        self._run("ceph", "-c", str(self.conf), "osd", "new", osd_uuid, "0")
        self._run("ceph-osd", "-c", str(self.conf), "-i", "0", "--mkfs", "--osd-uuid",
                  osd_uuid)
        self._run("ceph-osd", "-c", str(self.conf), "-i", "0")
        self._run("radosgw-admin", "-c", str(self.conf), "user", "create", "--uid=test",
                  "--display-name=test", f"--access-key={ACCESS_KEY}",
                  f"--secret-key={SECRET_KEY}", timeout=120)
        self.start_rgw()

    def start_rgw(self, timeout: float = 60) -> None:
        self._run("radosgw", "-c", str(self.conf), "-n", RGW_NAME)
        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(self.endpoint, timeout=2).read()
                return
            except urllib.error.HTTPError:
                return  # it answers (403 for an anonymous request is fine)
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"radosgw did not answer in {timeout} s\n"
                                       f"{self.log_tails()}") from None
                time.sleep(0.1)

    def _pid(self, name: str) -> int | None:
        try:
            return int((self.root / "run" / f"{name}.pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def _stop(self, name: str, timeout: float = 30) -> None:
        pid = self._pid(name)
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 10
            time.sleep(0.05)
        (self.root / "run" / f"{name}.pid").unlink(missing_ok=True)

    def stop_rgw(self) -> None:
        self._stop(RGW_NAME)

    def stop(self) -> None:
        """Stop rgw, then the OSD, then the mon (each by its pid file)."""
        for name in (RGW_NAME, "osd.0", "mon.a"):
            self._stop(name)


@contextmanager
def running(root: Path, **kw: object) -> Iterator[CephCluster]:
    """A started cluster under root whose AWS variables are in os.environ (so boto3, the
    CLI's subprocesses and the session processes they start all reach it) until it stops;
    the variables are put back as they were. The tests' module fixtures use it."""
    cluster = CephCluster(root, **kw)  # type: ignore[arg-type]
    saved = {k: os.environ.get(k) for k in cluster.env()}
    try:
        cluster.start()
        os.environ.update(cluster.env())
        yield cluster
    finally:
        cluster.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _alive(pid: int) -> bool:
    """Running (a zombie left for a non-init PID 1 to reap counts as stopped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"
