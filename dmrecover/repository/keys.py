"""Key files of an encrypted repository: unlock, add, remove, change a password; the key cache
of a live-restore session.

REPO/keys/<key id>.json each hold the master key sealed under one password (crypto.py). The
master key never changes: adding a key or changing a password rewrites no chunk.

A live-restore session must open its repository again after a crash or a reboot, with no
person there to type a password: it keeps the unsealed master key in its state dir (root's,
0700), in a file 0600 (`save_cache`), removed when the session is done; see
docs/architecture.md, "Repository format 2".
"""

from __future__ import annotations

import json
import os

from dmrecover.errors import RepositoryError, RepositoryUnavailable, UsageError
from dmrecover.repository.crypto import MasterKey, new_key_id, open_master, seal_master
from dmrecover.repository.store import Storage
from dmrecover.system import files

CACHE_FORMAT = "dmrecover-key-cache"


def key_ids(storage: Storage) -> list[str]:
    """Ids of the key files in the repository."""
    return [n[:-5] for n in storage.list("keys") if n.endswith(".json")]


def unlock(storage: Storage, location: str, password: str, repo_id: str) -> tuple[MasterKey,
                                                                                    str]:
    """The master key and the id of the key file the password opens; RepositoryError naming
    the cause (wrong password, no key files, a key of another repository)."""
    ids = key_ids(storage)
    if not ids:
        raise RepositoryError(f"repository {location} is encrypted but has no key files "
                              "(keys/ is empty)", hint="the repository is damaged")
    for kid in ids:
        try:
            blob = storage.get(f"keys/{kid}.json")
        except FileNotFoundError:
            continue
        except OSError as err:
            raise RepositoryUnavailable(f"cannot read keys/{kid}.json of {location}: "
                                        f"{err}") from err
        master = open_master(blob, password, kid)
        if master is None:
            continue
        if master.repo_id != repo_id:
            raise RepositoryError(f"key file keys/{kid}.json of {location} belongs to another "
                                  f"repository ({master.repo_id}, config.json says {repo_id})",
                                  hint="config.json or the key file was replaced")
        return master, kid
    raise RepositoryError(f"wrong password for repository {location}: none of its "
                          f"{len(ids)} key(s) opens with it",
                          hint="check --password-file, DMRECOVER_PASSWORD or "
                          "DMRECOVER_PASSWORD_FILE")


def add_key(storage: Storage, master: MasterKey, password: str,
            kdf: dict | None = None) -> str:
    """Store the master key under a new password; returns the new key id."""
    if not password:
        raise UsageError("the new password is empty")
    kid = new_key_id()
    storage.put_atomic(f"keys/{kid}.json", seal_master(master, password, kid, kdf))
    return kid


def remove_key(storage: Storage, location: str, key_id: str, current: str | None) -> None:
    """Delete key file `key_id`; never the last one, nor the one this process unlocked with."""
    ids = key_ids(storage)
    if key_id not in ids:
        raise UsageError(f"repository {location} has no key {key_id!r}",
                         hint="see its keys with: dmrecover repo key list")
    if key_id == current:
        raise UsageError(f"key {key_id} is the one this password opens: it cannot remove itself",
                         hint="open the repository with another key's password, or use "
                         "`repo key passwd`")
    if len(ids) == 1:
        raise UsageError(f"key {key_id} is the repository's last key")
    storage.delete(f"keys/{key_id}.json")


def describe_keys(storage: Storage) -> list[dict]:
    """id, created and KDF of every key file (nothing secret)."""
    out = []
    for kid in key_ids(storage):
        try:
            doc = json.loads(storage.get(f"keys/{kid}.json"))
        except (FileNotFoundError, ValueError):
            continue
        out.append({"id": kid, "created": doc.get("created"), "kdf": doc.get("kdf"),
                    "n": doc.get("n"), "r": doc.get("r"), "p": doc.get("p")})
    return out


def save_cache(path: str | os.PathLike[str], master: MasterKey, location: str) -> None:
    """Write the unsealed master key to path (0600, durable), for a session's unattended
    resume. The caller puts it in a private directory of root's."""
    doc = {"format": CACHE_FORMAT, "repo": location,
           "key": json.loads(master.to_json())}
    files.write_json_atomic(path, doc, mode=0o600)


def load_cache(path: str | os.PathLike[str], location: str) -> MasterKey | None:
    """The master key cached at path (None: no cache). A cache another user could have
    written, a damaged one or one of another repository: RepositoryError."""
    doc = files.read_trusted_json(path, error=RepositoryError)
    if doc is None:
        return None
    try:
        if doc.get("format") != CACHE_FORMAT:
            raise ValueError("not a key cache")
        master = MasterKey.from_json(json.dumps(doc["key"]).encode())
    except (ValueError, KeyError, TypeError) as err:
        raise RepositoryError(f"key cache {path} is unreadable: {err}",
                              hint="remove it and give the password (DMRECOVER_PASSWORD_FILE)"
                              ) from None
    if doc.get("repo") != location:
        raise RepositoryError(f"key cache {path} is for repository {doc.get('repo')}, not "
                              f"{location}", hint="remove it and give the password")
    return master


def forget_cache(path: str | os.PathLike[str]) -> None:
    """Remove a cached key (the session is done with its repository)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
