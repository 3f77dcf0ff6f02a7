"""Atomic writes: all or nothing, never overwrite, ordinary permissions."""

import os
import stat

import pytest

from ldm.io import atomic_write, atomic_write_dir, next_free_path


def test_atomic_write_never_overwrites_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write(target, lambda p: p.write_text("first"))
    with pytest.raises(FileExistsError):
        atomic_write(target, lambda p: p.write_text("second"))
    assert target.read_text() == "first"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.txt"]


def test_failed_write_leaves_nothing(tmp_path):
    def boom(p):
        p.write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "b.txt", boom)
    with pytest.raises(RuntimeError):
        atomic_write_dir(tmp_path / "d", lambda p: boom(p / "x"))
    assert list(tmp_path.iterdir()) == []


def test_overwrite_flag_replaces(tmp_path):
    target = tmp_path / "c.txt"
    atomic_write(target, lambda p: p.write_text("1"))
    atomic_write(target, lambda p: p.write_text("2"), overwrite=True)
    assert target.read_text() == "2"


def test_permissions_follow_umask(tmp_path):
    old = os.umask(0o022)
    try:
        f = atomic_write(tmp_path / "f.txt", lambda p: p.write_text("x"))
        d = atomic_write_dir(tmp_path / "dir", lambda p: (p / "y").write_text("y"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(f.stat().st_mode) == 0o644
    assert stat.S_IMODE(d.stat().st_mode) == 0o755


def test_next_free_path_counts_past_the_highest(tmp_path):
    assert next_free_path(tmp_path, "s", ".png").name == "00000-s.png"
    (tmp_path / "00007-x.png").write_text("")
    (tmp_path / "notes.txt").write_text("")
    assert next_free_path(tmp_path, "s", ".png").name == "00008-s.png"
