"""phi3mini.atomic: the one writer for files and folders: old content or new, never half; umask-respecting modes."""
import os
import stat

import pytest

from phi3lora import atomic


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_write_file_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "sub" / "config.json"
    atomic.write_file(p, "one")
    atomic.write_file(p, b"two")
    atomic.write_file(p, lambda tmp: tmp.write_text("three"))
    assert p.read_text() == "three"
    assert sorted(x.name for x in p.parent.iterdir()) == ["config.json"]


@pytest.mark.parametrize("where", ["fill", "rename"])
def test_failed_write_file_keeps_old_content_and_removes_temp(tmp_path, monkeypatch, where):
    p = tmp_path / "config.json"
    p.write_text("old")

    def fill(tmp):
        tmp.write_text("half")
        if where == "fill":
            raise OSError("disk full")

    if where == "rename":
        monkeypatch.setattr(os, "rename", lambda *a: (_ for _ in ()).throw(OSError("rename failed")))
    with pytest.raises(OSError):
        atomic.write_file(p, fill)
    monkeypatch.undo()
    assert p.read_text() == "old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["config.json"]


def test_write_dir_replaces_a_folder(tmp_path):
    final = tmp_path / "adapter"
    atomic.write_dir(final, lambda d: (d / "a").write_text("1"))
    atomic.write_dir(final, lambda d: (d / "b").write_text("2"))
    assert sorted(x.name for x in final.iterdir()) == ["b"]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["adapter"]  # no .tmp- / .old- leftovers


def test_failed_fill_keeps_the_old_folder(tmp_path):
    final = tmp_path / "adapter"
    atomic.write_dir(final, lambda d: (d / "a").write_text("1"))

    def fill(d):
        (d / "b").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.write_dir(final, fill)
    assert (final / "a").read_text() == "1" and not (final / "b").exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["adapter"]


def test_failed_rename_in_puts_the_old_folder_back(tmp_path, monkeypatch):
    final = tmp_path / "step-1"
    final.mkdir()
    (final / "a").write_text("old")
    tmp = tmp_path / "step-1.tmp"
    tmp.mkdir()
    (tmp / "a").write_text("new")
    real = os.rename

    def rename(src, dst):
        if os.fspath(src).endswith(".tmp"):
            raise OSError("rename failed")
        real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        atomic.replace_dir(tmp, final)
    monkeypatch.undo()
    assert (final / "a").read_text() == "old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["step-1"]


def test_modes_respect_the_umask(tmp_path, umask_022):
    # tempfile.mkdtemp / mkstemp would give 0700 / 0600 (issue 13.9)
    final = atomic.write_dir(tmp_path / "adapter", lambda d: (d / "w").write_bytes(b"x"))
    f = atomic.write_file(tmp_path / "config.json", "{}")
    g = atomic.write_file(tmp_path / "model.safetensors", lambda tmp: tmp.write_bytes(b"x"))
    assert mode(final) == 0o755
    assert mode(final / "w") == 0o644 and mode(f) == 0o644 and mode(g) == 0o644
