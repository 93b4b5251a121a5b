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


def test_presets_are_named_for_catalog_sizes_and_auto_picks_by_size():
    from genrec.core.config import SMALL_CATALOG, preset_for_catalog

    assert {"small", "medium"} <= set(preset_names())
    assert preset_for_catalog(1_682) == "small" and preset_for_catalog(SMALL_CATALOG - 1) == "small"
    assert preset_for_catalog(SMALL_CATALOG) == "medium" and preset_for_catalog(12_101) == "medium"
    for name in ("small", "medium"):  # the levers measured on real data are on by default
        rec = load_preset(name).recommender
        assert rec.item_loss > 0 and rec.rescore > 0 and rec.positions == "newest" and rec.max_history == 50
