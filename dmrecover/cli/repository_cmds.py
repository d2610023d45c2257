"""The repository verbs: `repo init`, `backup`, `list`, `verify`, `restore`."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from dmrecover.cli.common import require_root
from dmrecover.cli.progress_display import make_renderer
from dmrecover.repository.backup import backup, check_chunk_size
from dmrecover.repository.repo import Repository
from dmrecover.repository.restore import restore
from dmrecover.repository.verify import verify
from dmrecover.system.blockdev import is_block_device
from dmrecover.units import format_size

log = logging.getLogger("dmrecover")


def do_repo_init(args: argparse.Namespace) -> int:
    repo = Repository.init(args.repo)
    print(f"initialised repository at {repo.path}")
    return 0


def do_backup(args: argparse.Namespace) -> int:
    check_chunk_size(args.chunk_size)
    if is_block_device(args.source):
        require_root(f"backing up block device {args.source}")
    repo = Repository.open(args.repo)
    manifest = backup(args.source, repo, name=args.name, chunk_size=args.chunk_size,
                      renderer=make_renderer(args.progress))
    st = manifest.stats
    log.info("backup %s: %d chunks, %d new, %d deduplicated, %d zero", manifest.id,
             st.get("chunks", 0), st.get("new_chunks", 0), st.get("dedup_chunks", 0),
             st.get("zero_chunks", 0))
    print(manifest.id)
    return 0


def do_list(args: argparse.Namespace) -> int:
    manifests = Repository.open(args.repo).backups()
    if args.json:
        print(json.dumps([m.summary() for m in manifests], indent=2))
        return 0
    if not manifests:
        print("no backups")
        return 0
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
    repo = Repository.open(args.repo)
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
    repo = Repository.open(args.repo)
    manifest = repo.manifest(args.backup)
    restore(repo, manifest, args.dest, renderer=make_renderer(args.progress), force=args.force)
    print(f"restored {manifest.id} to {args.dest}")
    return 0
