import pytest

from multitag.config import Config, all_keys, apply_overrides, describe_recipes, list_recipes, load_config
from multitag.errors import UserError


def test_defaults_are_complete():
    cfg = Config()
    assert cfg.train.epochs > 0 and cfg.data.image_size > 0
    assert "train.epochs" in all_keys() and "aug.scale" in all_keys()


def test_overrides_are_typed():
    cfg = apply_overrides(Config(), ["train.epochs=3", "optim.lr=0.01", "aug.hflip=false", "aug.scale=[0.5, 1]",
                                     "model.args.drop_rate=0.2"])
    assert cfg.train.epochs == 3 and isinstance(cfg.train.epochs, int)
    assert cfg.optim.lr == 0.01 and cfg.aug.hflip is False and cfg.aug.scale == (0.5, 1)
    assert cfg.model.args == {"drop_rate": 0.2}


def test_unknown_key_names_the_closest():
    with pytest.raises(UserError, match='did you mean "train.epochs"'):
        apply_overrides(Config(), ["train.epoch=3"])


def test_bad_value_type_is_one_sentence():
    with pytest.raises(UserError, match='"train.epochs" must be a int'):
        apply_overrides(Config(), ["train.epochs=many"])


def test_missing_equals_sign():
    with pytest.raises(UserError, match="key=value"):
        apply_overrides(Config(), ["train.epochs"])


def test_recipes_load_and_unknown_recipe_suggests():
    assert "demo" in list_recipes()
    cfg = load_config("demo", ["train.epochs=2"])
    assert cfg.recipe == "demo" and cfg.train.epochs == 2 and cfg.model.name == "simple_cnn"
    assert any(r["name"] == "demo" and r["notes"] for r in describe_recipes())
    with pytest.raises(UserError, match='did you mean "demo"'):
        load_config("dem")


def test_yaml_with_unknown_section_key(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("train:\n  epocs: 3\n")
    with pytest.raises(UserError, match='unknown config key "train.epocs"'):
        load_config(str(bad))
