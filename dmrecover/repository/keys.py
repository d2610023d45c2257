"""Key files of an encrypted repository: unlock, add, remove, change a password.

REPO/keys/<key id>.json each hold the master key sealed under one password (crypto.py). The
master key never changes: adding a key or changing a password rewrites no chunk.
"""

from __future__ import annotations

import json

from dmrecover.errors import RepositoryError, RepositoryUnavailable, UsageError
from dmrecover.repository.crypto import MasterKey, new_key_id, open_master, seal_master
from dmrecover.repository.store import Storage


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
