import pytest

from zoo.atomic import atomic_file, atomic_write_text


def test_atomic_file_replaces_only_on_success(tmp_path):
    path = tmp_path / "sub" / "out.json"
    atomic_write_text(path, "first")
    assert path.read_text() == "first"
    with pytest.raises(RuntimeError):
        with atomic_file(path) as f:
            f.write("half-written")
            raise RuntimeError("killed mid-write")
    assert path.read_text() == "first"  # the old content survives a failed write
    assert [p.name for p in path.parent.iterdir()] == ["out.json"]  # and no temp file is left
    with atomic_file(path, "wb") as f:
        f.write(b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"


def test_atomic_file_rejects_other_modes(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        with atomic_file(tmp_path / "x", "a"):
            pass
