"""The repository verbs: `repo init`, `backup`, `list`, `verify`, `restore`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from dmrecover.cli.common import require_root
from dmrecover.cli.progress_display import make_renderer
from dmrecover.errors import UsageError
from dmrecover.repository import keys
from dmrecover.repository.backup import backup, check_chunk_size
from dmrecover.repository.crypto import PASSWORD_FILE_ENV, read_password_file
from dmrecover.repository.repo import Repository
from dmrecover.repository.restore import restore
from dmrecover.repository.store import path_within
from dmrecover.repository.verify import verify
from dmrecover.session.record import state_root
from dmrecover.system.blockdev import is_block_device
from dmrecover.units import format_size

log = logging.getLogger("dmrecover")


def _password(args: argparse.Namespace) -> str | None:
    """--password-file's password, else None (the library falls back to the environment)."""
    path = getattr(args, "password_file", None)
    return read_password_file(path) if path else None


def export_password_file(path: str) -> str:
    """argparse type of live-restore's --password-file: exported as DMRECOVER_PASSWORD_FILE so
    the session process it starts opens the repository too."""
    os.environ[PASSWORD_FILE_ENV] = os.path.abspath(path)
    return path


def open_repo(args: argparse.Namespace) -> Repository:
    """The repository of --repo, unlocked with the password of --password-file or the env."""
    return Repository.open(args.repo, password=_password(args))


def apart_from_state(repo: str) -> None:
    """UsageError when a local repository and dmrecover's state root overlap (either inside
    the other): a session's files must never land among the backups, nor backups among them."""
    if "://" in repo:
        return
    root = state_root()
    if path_within(repo, root) or path_within(root, repo):
        raise UsageError(f"repository {repo} and the dmrecover state root {root} overlap",
                         hint="keep each outside the other")


def do_repo_init(args: argparse.Namespace) -> int:
    apart_from_state(args.repo)
    repo = Repository.init(args.repo, encryption=args.encryption, password=_password(args))
    print(f"initialised repository at {repo.path} (encryption: {repo.encryption})")
    if repo.key_id:
        print(f"key {repo.key_id}: keep its password safe, the data cannot be read without it")
    return 0


def _require_encrypted(repo: Repository) -> None:
    if repo.encryption == "none":
        raise UsageError(f"repository {repo.path} is not encrypted: it has no keys")


def _encrypted_repo(args: argparse.Namespace) -> Repository:
    """The repository the key verbs act on: opened, and refused unless encrypted."""
    repo = open_repo(args)
    _require_encrypted(repo)
    return repo


def _add_new_key(repo: Repository, args: argparse.Namespace) -> str:
    """A key file for the master key under the password of --new-password-file; its id."""
    new = read_password_file(args.new_password_file)
    return keys.add_key(repo.storage, repo.codec.master, new)  # type: ignore[attr-defined]


def do_key_list(args: argparse.Namespace) -> int:
    repo = _encrypted_repo(args)
    for k in keys.describe_keys(repo.storage):
        mark = "*" if k["id"] == repo.key_id else " "
        print(f"{mark} {k['id']}  {k['kdf']} N={k['n']} r={k['r']} p={k['p']}")
    return 0


def do_key_add(args: argparse.Namespace) -> int:
    kid = _add_new_key(_encrypted_repo(args), args)
    print(f"added key {kid}")
    return 0


def do_key_remove(args: argparse.Namespace) -> int:
    repo = _encrypted_repo(args)
    keys.remove_key(repo.storage, str(repo.path), args.key_id, repo.key_id)
    print(f"removed key {args.key_id}")
    return 0


def do_key_passwd(args: argparse.Namespace) -> int:
    repo = _encrypted_repo(args)
    # The new key is durable before the old one goes: a crash in between leaves both.
    kid = _add_new_key(repo, args)
    repo.storage.delete(f"keys/{repo.key_id}.json")
    print(f"password changed: key {repo.key_id} replaced by key {kid}")
    return 0


def do_backup(args: argparse.Namespace) -> int:
    check_chunk_size(args.chunk_size)
    if is_block_device(args.source):
        require_root(f"backing up block device {args.source}")
    apart_from_state(args.repo)
    repo = open_repo(args)
    manifest = backup(args.source, repo, name=args.name, chunk_size=args.chunk_size,
                      renderer=make_renderer(args.progress))
    st = manifest.stats
    log.info("backup %s: %d chunks, %d new, %d deduplicated, %d zero", manifest.id,
             st.get("chunks", 0), st.get("new_chunks", 0), st.get("dedup_chunks", 0),
             st.get("zero_chunks", 0))
    print(manifest.id)
    return 0


def do_list(args: argparse.Namespace) -> int:
    repo = open_repo(args)
    manifests = repo.backups()
    if args.json:
        print(json.dumps([{**m.summary(), "encryption": repo.encryption} for m in manifests],
                         indent=2))
        return 0
    if not manifests:
        print("no backups")
        return 0
    print(f"repository {repo.path}: format {repo.config.get('version')}, encryption "
          f"{repo.encryption}")
    print(f"{'ID':<18} {'NAME':<20} {'CREATED':<20} {'SIZE':>10} {'CHUNK':>9} {'FS':<6} STORED")
    for m in manifests:
        s = m.summary()
        print(
            f"{m.id:<18} {m.name:<20} {s['created_iso']:<20} {format_size(m.size):>10} "
            f"{format_size(m.chunk_size):>9} {m.fstype or '-':<6} {s['stored_chunks']}"
            f"/{m.chunk_count}"
        )
    return 0


def do_verify(args: argparse.Namespace) -> int:
    repo = open_repo(args)
    bad = verify(repo, args.backup, renderer=make_renderer(args.progress))
    for problem in bad:
        print(problem, file=sys.stderr)
    if bad:
        print(f"verify: {len(bad)} bad chunk(s)", file=sys.stderr)
        return 1
    print("verify: all chunks good")
    return 0


def do_restore(args: argparse.Namespace) -> int:
    if is_block_device(args.dest):
        require_root(f"restoring to block device {args.dest}")
    repo = open_repo(args)
    manifest = repo.manifest(args.backup)
    restore(repo, manifest, args.dest, renderer=make_renderer(args.progress), force=args.force)
    print(f"restored {manifest.id} to {args.dest}")
    return 0
