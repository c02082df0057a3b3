"""poisonsweep.tasks.files.atomic_write: the target is either the old version or the new one, never a mix."""

import pytest

from poisonsweep.tasks.files import atomic_write


def test_a_file_is_replaced_whole_and_no_temporary_is_left(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    atomic_write(target, lambda temporary: temporary.write_bytes(b"new"))
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


@pytest.mark.parametrize("error, temporary_left", [(OSError, False), (KeyboardInterrupt, True)])
def test_a_failed_write_keeps_the_old_file(tmp_path, error, temporary_left):
    """An error removes the temporary; an interrupt (as for a killed writer) leaves it, hidden."""
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")

    def half(temporary):
        temporary.write_bytes(b"ne")
        raise error

    with pytest.raises(error):
        atomic_write(target, half)
    assert target.read_bytes() == b"old"
    left = [p.name for p in tmp_path.iterdir() if p.name != "a.bin"]
    assert len(left) == temporary_left
    assert all(name.startswith(".a.bin.") and name.endswith(".tmp") for name in left)


def test_a_folder_never_replaces_a_folder_that_holds_files(tmp_path):
    """Issue 22: the old folder (whoever's it was) is neither moved aside nor deleted; an empty one may be replaced."""
    target = tmp_path / "report"
    target.mkdir()
    (target / "keep.txt").write_text("the user's")

    def folder(temporary):
        temporary.mkdir()
        (temporary / "page.html").write_text("new")
        return temporary

    with pytest.raises(OSError):
        atomic_write(target, folder)
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # the temporary is gone too
    (target / "keep.txt").unlink()
    atomic_write(target, folder)
    assert sorted(p.name for p in target.iterdir()) == ["page.html"]
