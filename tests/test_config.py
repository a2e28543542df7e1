import pytest
import yaml

from cifarlab import config as cfg
from cifarlab.config import flat_settings
from cifarlab.errors import UserError
from cifarlab.presets import baseline, best, fast, get_preset, seed


def test_seed_preset_is_the_seed_recipe():
    c = seed()
    assert (c.batch_size, c.epochs, c.patience) == (256, 100, 30)
    assert (c.optim.lr, c.optim.momentum, c.optim.weight_decay) == (0.1, 0.9, 5e-4)
    assert (c.optim.label_smoothing, c.optim.warmup_epochs, c.optim.schedule) == (0.1, 5, "cosine")
    assert (c.data.val_fraction, c.data.split_seed) == (0.1, 43)
    a = c.data.augment
    assert (a.hflip, a.rotate_degrees, a.crop_padding, a.translate) == (0.5, 15, 4, 0.1)
    assert (a.brightness, a.contrast, a.saturation, a.hue) == (0.3, 0.3, 0.3, 0.1)
    assert (a.erase_p, a.erase_scale, a.erase_ratio) == (0.3, (0.02, 0.33), (0.3, 3.3))
    assert (c.model.name, c.model.width) == ("resnet18", 64)


def test_seed_preset_keeps_the_new_parts_off():
    c = seed()
    assert (c.optim.name, c.optim.nesterov, c.ema.enabled, c.ema.select) == (
        "sgd", False, False, "model")
    assert (c.mix.mixup_alpha, c.mix.cutmix_alpha, c.tensorboard) == (0, 0, False)


def test_best_preset_is_resnet18_with_the_cheap_parts_that_help():
    c = best().validate()
    s = flat_settings(seed())
    assert (c.model.name, c.model.width, c.data.split_seed) == ("resnet18", 64, 43)
    assert c.epochs <= 200 and c.patience == 0 and c.tta_flip
    assert (c.optim.name, c.optim.nesterov, c.optim.momentum) == ("sgd", True, 0.9)
    assert (c.optim.schedule, c.optim.warmup_epochs, c.optim.label_smoothing) == (
        "cosine", 5, 0.1)
    assert (c.ema.enabled, c.ema.select) == (True, "ema")
    a = c.data.augment
    assert (a.hflip, a.crop_padding) == (0.5, 4)
    assert (a.rotate_degrees, a.brightness, a.contrast, a.saturation, a.hue, a.translate) == (
        0, 0, 0, 0, 0, 0)
    assert (a.policy, a.cutout, a.erase_p) == ("trivialaugment", 16, 0)
    assert (c.mix.mixup_alpha, c.mix.cutmix_alpha) == (0, 0)
    assert get_preset("best").to_dict() == c.to_dict()
    assert {k for k in s if flat_settings(c)[k] != s[k]} >= {"epochs", "optim.nesterov"}


def test_baseline_differs_only_in_augmentation_loss_and_schedule():
    b, s = baseline().to_dict(), seed().to_dict()
    assert b["data"]["augment"] == cfg.AugmentConfig.off().__dict__ | {
        "erase_scale": [0.02, 0.33], "erase_ratio": [0.3, 3.3]}
    assert b["optim"]["label_smoothing"] == 0 and b["optim"]["schedule"] == "constant"
    assert b["optim"]["warmup_epochs"] == 0
    for key in ("model", "epochs", "batch_size", "patience"):
        assert b[key] == s[key]
    assert {k: v for k, v in b["data"].items() if k != "augment"} == {
        k: v for k, v in s["data"].items() if k != "augment"}


def test_fast_keeps_the_seed_data_split_model_and_normalisation():
    f, s = flat_settings(fast()), flat_settings(seed())
    changed = {k for k in s if f[k] != s[k]}
    assert not any(k.startswith(("model.", "data.")) and not k.startswith("data.augment.")
                   for k in changed)
    assert "seed" not in changed  # same weights and batch order seed
    assert f["data.augment.hflip"] == s["data.augment.hflip"]
    assert f["data.augment.crop_padding"] == s["data.augment.crop_padding"]


def test_overrides_are_typed_and_nested():
    c = cfg.apply_dict(seed(), cfg.parse_override("optim.lr=0.05"))
    c = cfg.apply_dict(c, cfg.parse_override("data.limit=500"))
    c = cfg.apply_dict(c, cfg.parse_override("data.augment.erase_scale=[0.1, 0.2]"))
    c = cfg.apply_dict(c, cfg.parse_override("epochs=3"))
    assert cfg.apply_dict(c, cfg.parse_override("optim.lr=1e-3")).optim.lr == 0.001
    assert c.optim.lr == 0.05 and c.data.limit == 500 and c.epochs == 3
    assert c.data.augment.erase_scale == (0.1, 0.2)
    assert seed().optim.lr == 0.1  # the original is not mutated
    assert isinstance(cfg.apply_dict(seed(), {"optim": {"lr": 1}}).optim.lr, float)


@pytest.mark.parametrize("text, message", [
    ("optim.lrr=0.1", "did you mean 'optim.lr'"),
    ("epochs=ten", "needs an integer"),
    ("epochs=true", "needs an integer"),
    ("optim=3", "is a section"),
    ("data.augment.erase_scale=0.1", "list of 2"),
    ("novalue", "expected key=value"),
])
def test_bad_overrides_name_the_problem(text, message):
    with pytest.raises(UserError, match=message):
        cfg.apply_dict(seed(), cfg.parse_override(text))


@pytest.mark.parametrize("update, message", [
    ({"epochs": 0}, "epochs"),
    ({"amp": "fp8"}, "'amp' must be one of"),
    ({"data": {"val_fraction": 1.0}}, "val_fraction"),
    ({"optim": {"schedule": "step"}}, "schedule"),
])
def test_validate_rejects_unusable_values(update, message):
    with pytest.raises(UserError, match=message):
        cfg.apply_dict(seed(), update).validate()


def test_yaml_round_trip(tmp_path):
    c = cfg.apply_dict(baseline(), {"model": {"width": 16}, "name": "x"})
    c.save(tmp_path / "c.yaml")
    assert cfg.from_dict(cfg.load_yaml(tmp_path / "c.yaml")) == c


def test_load_yaml_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        cfg.load_yaml(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(UserError, match="mapping"):
        cfg.load_yaml(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(UserError, match="not a readable YAML"):
        cfg.load_yaml(tmp_path / "bad.yaml")


def test_unknown_preset():
    with pytest.raises(UserError, match="unknown preset 'fastest'"):
        get_preset("fastest")


def test_validate_names_the_rule_and_a_valid_value():
    with pytest.raises(UserError, match=r"'optim.momentum' must be a number in \[0, 1\), got nan; "
                                        r"e.g. --set optim.momentum=0.9"):
        cfg.apply_dict(seed(), {"optim": {"momentum": float("nan")}}).validate()
    with pytest.raises(UserError, match="nesterov=true needs optim.momentum > 0"):
        cfg.apply_dict(seed(), {"optim": {"momentum": 0.0, "nesterov": True}}).validate()
    with pytest.raises(UserError, match=r"optim.accumulate=64 splits each batch .* at most "
                                        r"batch_size \(32\); e.g. --set optim.accumulate=8"):
        cfg.apply_dict(seed(), {"optim": {"accumulate": 64}, "batch_size": 32}
                       ).validate()
    with pytest.raises(UserError, match="leaves no validation images"):
        cfg.apply_dict(seed(), {"data": {"limit": 20, "val_fraction": 0.01}}).validate()
    for make in (seed, baseline, fast):
        assert make().validate() == make()


def test_load_yaml_refuses_duplicate_keys_and_keeps_on_off_as_words(tmp_path):
    (tmp_path / "dup.yaml").write_text("amp: 'off'\ndata:\n  limit: 100\n  limit: 200\n")
    with pytest.raises(UserError, match=r"key 'limit' appears twice \(lines 3 and 4\)"):
        cfg.load_yaml(tmp_path / "dup.yaml")
    (tmp_path / "words.yaml").write_text("amp: off\ncompile: off\ntta_flip: true\n")
    assert cfg.load_yaml(tmp_path / "words.yaml") == {"amp": "off", "compile": "off",
                                                      "tta_flip": True}
    assert cfg.parse_override("amp=off") == {"amp": "off"}


def test_set_preset_is_refused():
    with pytest.raises(UserError, match="--preset baseline"):
        cfg.parse_override("preset=baselin")
