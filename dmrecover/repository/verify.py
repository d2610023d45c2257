"""Verify: re-read, decompress and re-hash every chunk of one backup or of all backups.

Each distinct chunk is checked once however many backups share it; a bad one is reported for
every (backup, index) that names it, so the user sees which backups are damaged.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from dmrecover.progress import Progress, Renderer
from dmrecover.repository.manifest import Manifest
from dmrecover.repository.repo import Repository
from dmrecover.repository.restore import default_workers


def verify(repo: Repository, backup: str | None = None, renderer: Renderer | None = None,
           workers: int | None = None) -> list[str]:
    """Problems found (one line each, naming backup, chunk index and digest); empty if good.

    Raises BackupNotFound for an unknown `backup`, RepositoryUnavailable if the storage cannot
    be read at all.
    """
    problems: list[str] = []
    if backup is None:
        manifests, problems = repo.load_all()
    else:
        manifests = [repo.manifest(backup)]
    uses: dict[str, list[tuple[Manifest, int]]] = {}
    lengths: dict[str, int] = {}
    for m in manifests:
        for index, digest in enumerate(m.chunks):
            if digest is None:
                continue
            uses.setdefault(digest, []).append((m, index))
            lengths.setdefault(digest, m.chunk_length(index))
    progress = Progress("verify", total_bytes=sum(lengths.values()), total_items=len(lengths),
                        renderer=renderer)

    def check(digest: str) -> tuple[str, str | None]:
        problem = repo.chunk_problem(digest, lengths[digest])
        progress.update(lengths[digest], items=1)
        return digest, problem

    bad: dict[str, str] = {}
    try:
        with ThreadPoolExecutor(workers or default_workers(),
                                thread_name_prefix="verify") as pool:
            for digest, problem in pool.map(check, list(uses)):
                if problem:
                    bad[digest] = problem
    except BaseException:
        progress.renderer.close()  # leave the terminal clean for the error line
        raise
    for m in manifests:
        for index, digest in enumerate(m.chunks):
            if digest is not None and digest in bad:
                problems.append(f"backup {m.id} ({m.name}) chunk {index} ({digest}): "
                                f"{bad[digest]}")
    progress.finish(f"{len(lengths)} chunks checked, {len(bad)} bad")
    return problems
