"""A repository on S3-compatible object storage (AWS, Ceph RGW, MinIO, Garage): `S3Storage`.

Location `s3://BUCKET/PREFIX`. Credentials, region and endpoint come from boto3's standard
chain (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws/config and credentials,
AWS_ENDPOINT_URL); path-style addressing so that RGW and MinIO need no wildcard DNS.

Error mapping (what the repository and the live-restore fetcher rely on):
    missing object (404, NoSuchKey)                  -> FileNotFoundError (a missing chunk)
    connection refused/reset/timeout, 5xx, throttling -> RepositoryUnavailable (transient: the
                                                         fetcher waits and retries)
    no such bucket, access denied                    -> RepositoryError (needs a person)

An S3 PUT is atomic (the object is whole or absent) and durable when acknowledged, so
`put_atomic` is one PUT and `sync` has nothing to do.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dmrecover.errors import RepositoryError, RepositoryLocked, RepositoryUnavailable
from dmrecover.repository.store import Storage

SCHEME = "s3://"
# A lock object older than this is left by a killed writer (backups refresh nothing yet).
STALE_LOCK_SECONDS = 6 * 3600
_THROTTLE = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
             "RequestTimeTooSkewed", "ServiceUnavailable", "InternalError", "503", "500"}


def is_s3_url(location: str | os.PathLike[str]) -> bool:
    return str(location).startswith(SCHEME)


def parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of s3://BUCKET[/PREFIX]; prefix has no leading or trailing '/'."""
    rest = url[len(SCHEME):]
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    if len(bucket) < 3 or not all(c.isalnum() or c in "-." for c in bucket):
        raise RepositoryError(f"bad S3 repository URL {url!r}",
                              hint="use s3://BUCKET/PREFIX (bucket: 3+ letters, digits, - .)")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise RepositoryError(f"bad S3 repository URL {url!r}: empty or dot path component")
    return bucket, prefix


class S3Storage(Storage):
    """Objects under s3://BUCKET/PREFIX/ (keys as in the local layout)."""

    # Measured against RGW (bench/bench_s3.py, 2 GiB): offline restore 211 MiB/s with 3
    # workers, 239 with 8; the live restore's pool 240 with 4, 295 with 8.
    fetch_concurrency = 8

    def __init__(self, url: str, *, max_connections: int = 32, client: Any = None) -> None:
        self.url = url
        self.bucket, self.prefix = parse_s3_url(url)
        self._max_connections = max_connections
        self._own_client = client is None
        self._client = client or _make_client(max_connections)
        self._pid = os.getpid()
        self._client_lock = threading.Lock()
        # The exception types live in botocore: imported with the client (heavy, optional).
        import botocore.exceptions as bexc
        self._bexc = bexc
        self.gets = 0  # objects fetched (the tests count them)

    @property
    def client(self) -> Any:
        """The boto3 client of this process. After a fork (live-restore's session process
        inherits the repository its CLI opened) a new one: the parent's pooled connections
        are not the child's to use. Made from the same boto3 session, it takes ~10 ms, not
        the first client's ~0.3 s."""
        if self._pid != os.getpid():
            with self._client_lock:  # the fetcher's threads: one new client, not several
                if self._pid != os.getpid():
                    if self._own_client:
                        self._client = _make_client(self._max_connections)
                    self._pid = os.getpid()
        return self._client

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    # -- error mapping

    def _fail(self, err: Exception, what: str) -> Exception:
        """The project error for a botocore/network failure while doing `what`."""
        bexc = self._bexc
        if isinstance(err, bexc.ClientError):
            code = str(err.response.get("Error", {}).get("Code", ""))
            status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if code in ("NoSuchKey", "404", "NotFound"):
                return FileNotFoundError(2, f"{what}: no such object")
            if code == "NoSuchBucket":
                return RepositoryError(f"{what}: bucket {self.bucket} does not exist",
                                       hint=f"create the repository: dmrecover repo init "
                                       f"{self.url}")
            if code in _THROTTLE or status >= 500 or status == 429:
                return RepositoryUnavailable(f"{what}: S3 server answered {code or status}",
                                             hint="the read will be retried")
            return RepositoryError(f"{what}: S3 error {code or status}: "
                                   f"{err.response.get('Error', {}).get('Message', '')}",
                                   hint="check the credentials and the bucket's permissions")
        if isinstance(err, bexc.NoCredentialsError):
            return RepositoryError(f"{what}: no S3 credentials",
                                   hint="set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or "
                                   "AWS_PROFILE")
        if isinstance(err, (bexc.EndpointConnectionError, bexc.ConnectionClosedError,
                            bexc.ReadTimeoutError, bexc.ConnectTimeoutError,
                            bexc.HTTPClientError, bexc.ResponseStreamingError,
                            ConnectionError, socket.timeout, OSError)):
            return RepositoryUnavailable(f"{what}: S3 endpoint unreachable "
                                         f"({type(err).__name__})",
                                         hint="check the network and the S3 server; reads are "
                                         "retried")
        return err

    def _call(self, what: str, fn, **kwargs) -> Any:
        try:
            return fn(Bucket=self.bucket, **kwargs)
        except Exception as err:  # noqa: BLE001 - mapped to the project's errors below
            mapped = self._fail(err, what)
            if mapped is err:
                raise
            raise mapped from err

    # -- Storage

    def get(self, key: str, max_size: int | None = None) -> bytes:
        what = f"reading {self.url}/{key}"
        kwargs: dict[str, Any] = {"Key": self._key(key)}
        if max_size is not None:
            # At most max_size + 1 bytes: the caller tells an oversized object by its length.
            kwargs["Range"] = f"bytes=0-{max_size}"
        try:
            resp = self._call(what, self.client.get_object, **kwargs)
        except RepositoryError as err:
            if "InvalidRange" in err.message:  # an empty object has no byte 0
                return b""
            raise
        try:
            data = resp["Body"].read()
        except Exception as err:  # noqa: BLE001 - a connection lost mid-body
            mapped = self._fail(err, what)
            if mapped is err:
                raise
            raise mapped from err
        self.gets += 1
        return data

    def put_atomic(self, key: str, data: bytes, *, sync_dir: bool = True) -> None:
        self._call(f"writing {self.url}/{key}", self.client.put_object,
                   Key=self._key(key), Body=bytes(data))

    def exists(self, key: str) -> bool:
        try:
            self._call(f"checking {self.url}/{key}", self.client.head_object,
                       Key=self._key(key))
        except FileNotFoundError:
            return False
        return True

    def list(self, prefix: str) -> list[str]:
        sub = prefix.strip("/")
        base = self._key(sub) + "/" if sub else (f"{self.prefix}/" if self.prefix else "")
        names: set[str] = set()
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Prefix": base, "Delimiter": "/"}
            if token:
                kwargs["ContinuationToken"] = token
            resp = self._call(f"listing {self.url}/{prefix}", self.client.list_objects_v2,
                              **kwargs)
            for obj in resp.get("Contents", []):
                names.add(obj["Key"][len(base):])
            for cp in resp.get("CommonPrefixes", []):
                names.add(cp["Prefix"][len(base):].rstrip("/"))
            if not resp.get("IsTruncated"):
                break
            token = resp.get("NextContinuationToken")
        names.discard("")
        return sorted(names)

    def delete(self, key: str) -> None:
        self._call(f"deleting {self.url}/{key}", self.client.delete_object, Key=self._key(key))

    def sync(self) -> None:
        """Nothing to do: an acknowledged PUT is durable."""

    # -- what the repository needs beyond Storage

    def is_empty(self) -> bool:
        """True when nothing is stored under the prefix; creates a missing bucket."""
        try:
            self._call(f"checking bucket {self.bucket}", self.client.head_bucket)
        except (FileNotFoundError, RepositoryError) as err:
            if isinstance(err, RepositoryUnavailable):
                raise
            self._call(f"creating bucket {self.bucket}", self.client.create_bucket)
            return True
        base = self._key("")
        resp = self._call(f"listing {self.url}", self.client.list_objects_v2,
                          Prefix=base, MaxKeys=1)
        return not resp.get("Contents")

    @contextmanager
    def writer_lock(self) -> Iterator[None]:
        """A lock object locks/<token>: a second writer sees it and gets RepositoryLocked.

        Object stores have no atomic create-if-absent everywhere (RGW 16 has none), so both
        writers write their lock, then each checks for the other's: two racing writers may both
        back off, never both proceed. A lock older than STALE_LOCK_SECONDS is a killed
        writer's and is ignored.
        """
        token = f"{int(time.time()):010d}-{secrets.token_hex(6)}"
        mine = f"locks/{token}"
        self.put_atomic(mine, f"{socket.gethostname()} {os.getpid()}\n".encode())
        try:
            now = time.time()
            for name in self.list("locks"):
                if name == token:
                    continue
                try:
                    started = int(name.split("-", 1)[0])
                except ValueError:
                    continue
                if now - started < STALE_LOCK_SECONDS:
                    raise RepositoryLocked(
                        f"repository {self.url} is locked by another writer (lock {name})",
                        hint="wait for it to finish; a lock left by a killed writer expires "
                        f"after {STALE_LOCK_SECONDS // 3600} h or can be deleted by hand")
            yield
        finally:
            self.delete(mine)


# This process's boto3 session (a forked child's too: it holds no sockets), with the AWS_*
# environment it was made under: a changed environment (credentials, endpoint) gets a new one.
_SESSION: tuple[tuple, Any] | None = None
_SESSION_LOCK = threading.Lock()  # a boto3 session is not thread-safe; its clients are


def _boto_session() -> Any:
    """One boto3 session per process (per AWS_* environment): it caches the parsed service
    model and the credentials, so a second client costs ~10 ms instead of ~0.3 s."""
    global _SESSION
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    if _SESSION is None or _SESSION[0] != env:
        # boto3 takes ~0.3 s to import: only repositories on S3 pay for it.
        import boto3
        _SESSION = (env, boto3.session.Session())
    return _SESSION[1]


def _make_client(max_connections: int) -> Any:
    from botocore.config import Config  # with boto3: heavy, optional (see _boto_session)
    config = Config(
        region_name=_region(),
        # Few quick retries here: the live-restore fetcher has its own wait-and-retry loop
        # with a deadline, and a blocked read must surface as RepositoryUnavailable soon.
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=5,
        read_timeout=30,
        max_pool_connections=max_connections,
        s3={"addressing_style": "path"},
        # Every object is authenticated by the repository itself; skip the extra checksums
        # (and RGW over HTTPS rejects some of them).
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    with _SESSION_LOCK:
        session = _boto_session()
        return session.client("s3", config=config)


def _region() -> str:
    with _SESSION_LOCK:
        return _boto_session().region_name or "us-east-1"
