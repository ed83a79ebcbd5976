import pytest

from traineagle3.atomic import publish


def test_publish_is_all_or_nothing_and_first_writer_wins(tmp_path):
    final = tmp_path / "entry"
    with pytest.raises(RuntimeError):
        with publish(final) as tmp:
            tmp.mkdir()
            (tmp / "half").write_text("x")
            raise RuntimeError("killed mid-build")
    assert not final.exists() and list(tmp_path.iterdir()) == []
    for content in ["first", "second"]:
        with publish(final) as tmp:
            tmp.mkdir()
            (tmp / "data").write_text(content)
    assert (final / "data").read_text() == "first" and list(tmp_path.iterdir()) == [final]
