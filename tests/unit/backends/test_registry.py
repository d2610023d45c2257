"""The backend registry: names, lookup, and what `--backend auto` chooses (no root needed)."""

from __future__ import annotations

import pytest

from dmrecover.backends import registry
from dmrecover.backends.base import Backend
from dmrecover.backends.dm import DmBackend
from dmrecover.backends.dm_clone import DmCloneBackend
from dmrecover.backends.fuse import FuseBackend
from dmrecover.errors import BackendUnavailable, NotRootError, UsageError


def fake(name: str, priority: int, *, missing: str | None = None,
         not_root: bool = False) -> type[Backend]:
    """A Backend subclass whose probe fails as asked; it does nothing else."""

    def probe(self: Backend) -> None:
        if not_root:
            raise NotRootError(f"{name} needs root")
        if missing:
            raise BackendUnavailable(f"{name} needs {missing}", hint=f"install {missing}")

    def unused(self: Backend, *args: object) -> None:
        raise AssertionError("not part of choosing a backend")

    return type(f"Fake{name.title()}", (Backend,), {
        "name": name, "description": f"fake {name}", "priority": priority, "probe": probe,
        "present": unused, "merge_into_dest": unused, "teardown_dead": unused,
        "leftovers": unused, "remove_leftover": unused})


@pytest.fixture
def backends(monkeypatch: pytest.MonkeyPatch):
    def install(*classes: type[Backend]) -> None:
        monkeypatch.setattr(registry, "_BACKENDS", tuple(classes))

    return install


def test_the_real_backends_and_their_flags() -> None:
    assert set(registry.names()) == {"dm-clone", "dm", "fuse"}
    assert isinstance(registry.get("fuse"), FuseBackend)
    assert isinstance(registry.get("dm"), DmBackend)
    assert isinstance(registry.get("dm-clone"), DmCloneBackend)
    # auto prefers dm-clone where the clone target exists, then dm, then fuse
    assert DmCloneBackend.priority > DmBackend.priority > FuseBackend.priority
    assert (DmCloneBackend.kernel_takes_writes, DmCloneBackend.supports_online_cutover,
            DmCloneBackend.resume_at_boot) == (True, True, True)
    assert (FuseBackend.priority, FuseBackend.kernel_takes_writes,
            FuseBackend.supports_online_cutover, FuseBackend.resume_at_boot) == \
        (0, False, False, False)
    assert (DmBackend.priority, DmBackend.kernel_takes_writes,
            DmBackend.supports_online_cutover, DmBackend.resume_at_boot) == \
        (10, True, True, True)


def test_names_follow_the_registry(backends) -> None:
    backends(fake("a", 1), fake("b", 2))
    assert registry.names() == ["a", "b"]


def test_get_unknown_is_a_usage_error_naming_the_choices(backends) -> None:
    backends(fake("a", 1), fake("b", 2))
    with pytest.raises(UsageError) as err:
        registry.get("zfs")
    assert "zfs" in str(err.value) and "a, b" in str(err.value)


def test_auto_picks_the_available_backend_with_the_highest_priority(backends) -> None:
    backends(fake("low", 0), fake("high", 10), fake("mid", 5))
    assert registry.choose("auto").name == "high"
    backends(fake("low", 0), fake("high", 10, missing="a kernel target"), fake("mid", 5))
    assert registry.choose("auto").name == "mid"
    # A backend that needs root is not available to a non-root caller: auto goes on.
    backends(fake("low", 0), fake("high", 10, not_root=True))
    assert registry.choose("auto").name == "low"


def test_auto_with_nothing_available_says_so(backends) -> None:
    backends(fake("a", 0, missing="x"), fake("b", 1, missing="y"))
    with pytest.raises(BackendUnavailable, match="no backend"):
        registry.choose("auto")


def test_a_named_backend_is_probed_and_its_reason_surfaces(backends) -> None:
    backends(fake("low", 0), fake("high", 10, missing="dmsetup"))
    with pytest.raises(BackendUnavailable) as err:
        registry.choose("high")
    assert str(err.value) == "high needs dmsetup: install dmsetup"
    assert registry.choose("low").name == "low"  # named: chosen even with a higher one around
    with pytest.raises(UsageError):
        registry.choose("nope")
