import pytest

from genrec.core.atomic import atomic_dir, atomic_file


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as f:
            f.write("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_a_failed_directory_leaves_the_old_one(tmp_path):
    target = tmp_path / "bundle"
    with atomic_dir(target) as d:
        (d / "x").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as d:
            (d / "x").write_text("v2-half")
            raise RuntimeError("crash")
    assert (target / "x").read_text() == "v1" and [p.name for p in tmp_path.iterdir()] == ["bundle"]
    with atomic_dir(target) as d:
        (d / "x").write_text("v2")
    assert (target / "x").read_text() == "v2" and [p.name for p in tmp_path.iterdir()] == ["bundle"]
