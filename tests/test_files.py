"""tasks.files.atomic_write: the target is either the old version or the new one, never a mix."""

import pytest

from tasks.files import atomic_write, atomic_write_bytes


def test_a_file_is_replaced_whole_and_no_temporary_is_left(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_a_failed_write_keeps_the_old_file_and_removes_its_temporary(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")

    def half(temporary):
        temporary.write_bytes(b"ne")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, half)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_an_interrupted_write_leaves_a_hidden_temporary_and_the_old_file(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")

    def interrupted(temporary):
        temporary.write_bytes(b"ne")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, interrupted)
    assert target.read_bytes() == b"old"
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != "a.bin")
    assert len(left) == 1 and left[0].startswith(".a.bin.") and left[0].endswith(".tmp")


def test_a_folder_replaces_an_earlier_folder_whole(tmp_path):
    target = tmp_path / "report"
    target.mkdir()
    (target / "stale.txt").write_text("from the earlier report")

    def folder(temporary):
        temporary.mkdir()
        (temporary / "page.html").write_text("new")
        return temporary

    written = atomic_write(target, folder)
    assert written.name.startswith(".report.") and not written.exists()
    assert sorted(p.name for p in target.iterdir()) == ["page.html"]
    assert [p.name for p in tmp_path.iterdir()] == ["report"]
