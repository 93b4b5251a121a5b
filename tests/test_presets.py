import pytest

from genrec.core.config import load_preset, preset_names


@pytest.mark.parametrize("name", preset_names())
def test_every_shipped_preset_loads(name):
    p = load_preset(name)
    assert p.recommender.d_model % p.recommender.n_heads == 0


def test_a_bad_preset_says_which_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("recommender: {d_model: -3}\n")
    with pytest.raises(ValueError, match="d_model"):
        load_preset(str(path))
