"""Issue 9 through the CLI: bad sizes, the repository apart from dmrecover's state and from
restore destinations, ambiguous references, damaged manifests: one line, non-zero exit,
nothing changed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dmrecover.errors import BackupNotFound, RepositoryError, UsageError
from tests.helpers.cli import CliRunner

MiB = 1 << 20


@pytest.fixture
def setup(tmp_path: Path, cli: CliRunner) -> dict:
    repo = tmp_path / "repo"
    assert cli("repo", "init", "--encryption", "none", str(repo))[0] == 0
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(MiB))
    rc, out, _ = cli("backup", str(src), "--repo", str(repo), "--chunk-size", "256K",
                     "--name", "vol")
    assert rc == 0
    return {"repo": repo, "src": src, "id": out.strip(), "tmp": tmp_path}


@pytest.mark.parametrize("size", ["inf", "nan", "-4M", "1e999", "1e999K", "-inf", "4x"])
def test_bad_chunk_size_is_a_usage_error(setup: dict, cli: CliRunner, size: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    before = sorted(os.listdir(setup["repo"] / "backups"))
    with pytest.raises(SystemExit) as info:  # argparse's usage error
        cli("backup", str(setup["src"]), "--repo", str(setup["repo"]),
            f"--chunk-size={size}")
    err = capsys.readouterr().err
    assert info.value.code == 2 and "bad size" in cli.error_line(err)
    assert sorted(os.listdir(setup["repo"] / "backups")) == before


def test_restore_into_the_repository_refused(setup: dict, cli: CliRunner) -> None:
    repo = setup["repo"]
    config = (repo / "config.json").read_bytes()
    link = setup["tmp"] / "link.img"
    link.symlink_to(repo / "config.json")
    for dest in (repo / "config.json", link, repo / "backups" / f"{setup['id']}.json"):
        rc, _, err = cli("restore", "--repo", str(repo), setup["id"], str(dest))
        assert rc == UsageError.exit_code
        assert "inside repository" in cli.error_line(err)
    assert (repo / "config.json").read_bytes() == config
    rc, _, _ = cli("verify", "--repo", str(repo))
    assert rc == 0


def test_repo_init_and_backup_apart_from_the_state_root(tmp_path: Path, cli: CliRunner,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    monkeypatch.setenv("DMRECOVER_STATE_ROOT", str(state))
    rc, _, err = cli("repo", "init", "--encryption", "none", str(state / "repo"))
    assert rc == UsageError.exit_code and "state" in cli.error_line(err)
    assert not (state / "repo").exists()
    # the state root under the new repository (it does not exist yet: by path)
    monkeypatch.setenv("DMRECOVER_STATE_ROOT", str(tmp_path / "r2" / "state"))
    rc, _, err = cli("repo", "init", "--encryption", "none", str(tmp_path / "r2"))
    assert rc == UsageError.exit_code and "state" in cli.error_line(err)
    assert not (tmp_path / "r2").exists()
    # a repository made before the state root was moved into it: backup refuses
    monkeypatch.delenv("DMRECOVER_STATE_ROOT")
    assert cli("repo", "init", "--encryption", "none", str(state / "old"))[0] == 0
    monkeypatch.setenv("DMRECOVER_STATE_ROOT", str(state))
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(MiB))
    rc, _, err = cli("backup", str(src), "--repo", str(state / "old"))
    assert rc == UsageError.exit_code and "state" in cli.error_line(err)
    assert os.listdir(state / "old" / "backups") == []


def test_ambiguous_reference_names_both(setup: dict, cli: CliRunner) -> None:
    repo, first = setup["repo"], setup["id"]
    rc, out, _ = cli("backup", str(setup["src"]), "--repo", str(repo), "--name", first[:5])
    second = out.strip()
    dest = setup["tmp"] / "out.img"
    rc, _, err = cli("restore", "--repo", str(repo), first[:5], str(dest))
    line = cli.error_line(err)
    assert rc == BackupNotFound.exit_code and "ambiguous" in line
    assert first in line and second in line
    assert not dest.exists()


def test_damaged_manifest_is_one_line(setup: dict, cli: CliRunner) -> None:
    repo, bid = setup["repo"], setup["id"]
    path = repo / "backups" / f"{bid}.json"
    d = json.loads(path.read_bytes())
    d["chunks"][0] = "../../../dev/zero"
    path.write_text(json.dumps(d))
    dest = setup["tmp"] / "out.img"
    rc, _, err = cli("restore", "--repo", str(repo), bid, str(dest))
    line = cli.error_line(err)
    assert rc == RepositoryError.exit_code and "corrupt" in line and "chunk 0" in line
    assert not dest.exists()
    d["chunks"][0] = 12345
    path.write_text(json.dumps(d))
    rc, _, err = cli("restore", "--repo", str(repo), bid, str(dest))
    assert rc == RepositoryError.exit_code and "corrupt" in cli.error_line(err)
    rc, _, err = cli("verify", "--repo", str(repo))
    assert rc == 1 and "corrupt" in err


def test_restored_file_is_private(setup: dict, cli: CliRunner) -> None:
    dest = setup["tmp"] / "out.img"
    old = os.umask(0)
    try:
        rc, _, _ = cli("restore", "--repo", str(setup["repo"]), setup["id"], str(dest))
    finally:
        os.umask(old)
    assert rc == 0 and (dest.stat().st_mode & 0o777) == 0o600
