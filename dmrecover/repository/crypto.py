"""Repository encryption and authentication (format 2), after restic's and borg's designs.

Keys:
    A random master key: 32 bytes for AES-256-GCM (encryption) and 32 bytes for keyed BLAKE3
    (chunk ids). It is stored in REPO/keys/<key id>.json, sealed with AES-256-GCM under a key
    derived from a password by scrypt (salt and parameters stored beside it). Several key files
    may hold the same master key (`repo key add`); each opens with its own password.

Objects:
    chunk id   = keyed BLAKE3 (MAC key) of the plain bytes: ids reveal nothing and cannot be
                 forged without the key.
    chunk      = nonce(12) || AES-256-GCM(zstd frame), associated data "chunk <repo id> <id>":
                 a chunk stored under another chunk's name (swapped), or copied from another
                 repository, fails authentication.
    manifest   = nonce(12) || AES-256-GCM(envelope JSON), associated data
                 "manifest <repo id> <backup id>". The envelope holds the manifest and the ids of
                 every backup that existed when it was written ("prev"), so a manifest renamed,
                 copied from another repository or altered fails, and a deleted (rolled back)
                 older backup is reported by each later one. Not detected: deleting the newest
                 backups (nothing names them yet) or replacing the whole repository with an
                 older copy of itself; that needs state kept by the client.

Random 96-bit nonces: safe for far more than 2**32 objects' worth of chunks per key at the
default 4 MiB chunk size (16 PiB); no nonce is ever derived from the content.

The `Codec` seen by the repository is `PlainCodec` (format 1, `--encryption none`) or
`AeadCodec`; neither prints nor touches storage.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import time

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dmrecover.errors import RepositoryError

ENCRYPTION = "aes-256-gcm"
KEYED_HASH = "blake3-keyed"
PLAIN_HASH = "blake3"
NONCE = 12
# scrypt: N=2**15, r=8, p=1 is restic's default (32 MiB, ~0.1 s); tests may pass cheaper ones.
KDF_DEFAULT = {"kdf": "scrypt", "n": 1 << 15, "r": 8, "p": 1}
PASSWORD_ENV = "DMRECOVER_PASSWORD"
PASSWORD_FILE_ENV = "DMRECOVER_PASSWORD_FILE"


class Tampered(Exception):
    """An object failed authentication: altered, swapped, or sealed under another key."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode(), validate=True)


class PlainCodec:
    """Format 1 and `--encryption none`: plain BLAKE3 ids, objects stored as they are."""

    encryption = "none"
    hash_name = PLAIN_HASH

    def chunk_id(self, data: bytes | bytearray | memoryview) -> str:
        return blake3.blake3(data).hexdigest()

    def seal_chunk(self, digest: str, frame: bytes) -> bytes:
        return frame

    def open_chunk(self, digest: str, blob: bytes) -> bytes:
        return blob

    def seal_manifest(self, backup_id: str, payload: bytes, prev: list[str]) -> bytes:
        return payload

    def open_manifest(self, backup_id: str, blob: bytes) -> tuple[bytes, list[str] | None]:
        """The manifest's JSON and the backups it names as existing before it (None: not
        recorded)."""
        return blob, None


class AeadCodec(PlainCodec):
    """Format 2, encrypted: keyed ids, AES-256-GCM sealed chunks and manifests."""

    encryption = ENCRYPTION
    hash_name = KEYED_HASH

    def __init__(self, master: MasterKey, repo_id: str) -> None:
        self.master = master
        self.repo_id = repo_id
        self._aead = AESGCM(master.enc_key)

    def chunk_id(self, data: bytes | bytearray | memoryview) -> str:
        return blake3.blake3(data, key=self.master.mac_key).hexdigest()

    def _seal(self, plain: bytes, ad: bytes) -> bytes:
        nonce = os.urandom(NONCE)
        return nonce + self._aead.encrypt(nonce, plain, ad)

    def _open(self, blob: bytes, ad: bytes) -> bytes:
        if len(blob) < NONCE + 16:
            raise Tampered("too short to be a sealed object")
        try:
            return self._aead.decrypt(blob[:NONCE], blob[NONCE:], ad)
        except InvalidTag:
            raise Tampered("authentication failed (altered, swapped or foreign)") from None

    def seal_chunk(self, digest: str, frame: bytes) -> bytes:
        return self._seal(frame, f"chunk {self.repo_id} {digest}".encode())

    def open_chunk(self, digest: str, blob: bytes) -> bytes:
        return self._open(blob, f"chunk {self.repo_id} {digest}".encode())

    def seal_manifest(self, backup_id: str, payload: bytes, prev: list[str]) -> bytes:
        envelope = json.dumps({"manifest": json.loads(payload), "prev": sorted(prev)},
                              separators=(",", ":")).encode()
        return self._seal(envelope, f"manifest {self.repo_id} {backup_id}".encode())

    def open_manifest(self, backup_id: str, blob: bytes) -> tuple[bytes, list[str] | None]:
        plain = self._open(blob, f"manifest {self.repo_id} {backup_id}".encode())
        try:
            envelope = json.loads(plain)
            prev = [str(p) for p in envelope["prev"]]
            payload = json.dumps(envelope["manifest"]).encode()
        except (ValueError, KeyError, TypeError) as err:
            # Authenticated yet malformed: written by a broken writer, not an attacker.
            raise ValueError(f"bad manifest envelope: {err}") from None
        return payload, prev


class MasterKey:
    """The repository's secret: an encryption key and a MAC key (32 bytes each)."""

    def __init__(self, enc_key: bytes, mac_key: bytes, repo_id: str) -> None:
        if len(enc_key) != 32 or len(mac_key) != 32:
            raise ValueError("master keys are 32 bytes each")
        self.enc_key = enc_key
        self.mac_key = mac_key
        self.repo_id = repo_id

    @classmethod
    def generate(cls, repo_id: str) -> MasterKey:
        return cls(secrets.token_bytes(32), secrets.token_bytes(32), repo_id)

    def to_json(self) -> bytes:
        return json.dumps({"enc_key": _b64(self.enc_key), "mac_key": _b64(self.mac_key),
                           "repo_id": self.repo_id, "encryption": ENCRYPTION}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> MasterKey:
        d = json.loads(data)
        return cls(_unb64(d["enc_key"]), _unb64(d["mac_key"]), str(d["repo_id"]))


def _derive(password: str, salt: bytes, params: dict) -> bytes:
    if params.get("kdf") != "scrypt":
        raise RepositoryError(f"key file uses unknown KDF {params.get('kdf')!r}",
                              hint="use the dmrecover version that created it")
    n, r, p = int(params["n"]), int(params["r"]), int(params["p"])
    if n < 2 or n & (n - 1) or n > 1 << 22 or not 1 <= r <= 32 or not 1 <= p <= 16:
        raise RepositoryError(f"key file has unusable scrypt parameters N={n} r={r} p={p}")
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32,
                          maxmem=256 * n * r + (64 << 20))


def _key_ad(key_id: str) -> bytes:
    return f"key {key_id}".encode()


def new_key_id() -> str:
    return secrets.token_hex(8)


def seal_master(master: MasterKey, password: str, key_id: str,
                kdf: dict | None = None) -> bytes:
    """A key file: the master key sealed under a key derived from password."""
    params = dict(kdf or KDF_DEFAULT)
    salt = secrets.token_bytes(32)
    wrap = AESGCM(_derive(password, salt, params))
    nonce = os.urandom(NONCE)
    data = wrap.encrypt(nonce, master.to_json(), _key_ad(key_id))
    doc = {**params, "salt": _b64(salt), "nonce": _b64(nonce), "data": _b64(data),
           "created": time.time(), "id": key_id}
    return (json.dumps(doc, indent=2) + "\n").encode()


def open_master(blob: bytes, password: str, key_id: str) -> MasterKey | None:
    """The master key from a key file, None if the password does not open it."""
    try:
        doc = json.loads(blob)
        salt, nonce, data = _unb64(doc["salt"]), _unb64(doc["nonce"]), _unb64(doc["data"])
    except (ValueError, KeyError, TypeError) as err:
        raise RepositoryError(f"key file keys/{key_id}.json is unreadable: {err}") from None
    wrap = AESGCM(_derive(password, salt, doc))
    try:
        plain = wrap.decrypt(nonce, data, _key_ad(key_id))
    except InvalidTag:
        return None
    return MasterKey.from_json(plain)


def password_from_env() -> str | None:
    """DMRECOVER_PASSWORD, else the first line of DMRECOVER_PASSWORD_FILE, else None."""
    if os.environ.get(PASSWORD_ENV):
        return os.environ[PASSWORD_ENV]
    path = os.environ.get(PASSWORD_FILE_ENV)
    if path:
        return read_password_file(path)
    return None


def read_password_file(path: str) -> str:
    """The first line of a password file (without its newline), RepositoryError if unusable."""
    try:
        with open(path, "rb") as f:
            line = f.readline(4096).rstrip(b"\r\n").decode()
    except OSError as err:
        raise RepositoryError(f"cannot read password file {path}: {err.strerror}") from err
    except UnicodeDecodeError:
        raise RepositoryError(f"password file {path} is not UTF-8 text",
                              hint="give a file whose first line is the password") from None
    if not line:
        raise RepositoryError(f"password file {path} is empty")
    return line
