"""Config knobs of the method's own sections (slade_dist/config.py): data.augment / pretrain.augment,
basis.beta's exclusive bound, basis.sd_grad. The generic loading rules are tests/unit/test_config.py."""

from __future__ import annotations

import pytest

from slade_dist.config import ConfigError, load_config


def test_augment_keys_layer_like_any_other():
    cfg = load_config(None, ["data.augment.flip=false", "data.augment.rotation_degrees=15"])
    assert cfg.data.augment.flip is False and cfg.data.augment.rotation_degrees == 15.0
    assert cfg.data.augment.crop_scale_min is None  # null: data.crop_scale_min
    assert cfg.pretrain.augment.flip is True  # the SwAV views keep their own
    sw = cfg.pretrain.augment
    assert (sw.jitter_brightness, sw.jitter_contrast, sw.jitter_saturation, sw.jitter_hue) == (0.4, 0.4, 0.4, 0.1)
    assert (sw.jitter_p, sw.grayscale_p) == (0.8, 0.2)
    assert cfg.basis.sd_grad == "full"


@pytest.mark.parametrize(
    "override,pattern",
    [
        ("basis.beta=1.0", r"basis.beta .* must be below 1"),
        ("data.augment.crop_scale_max=0.1", r"data.crop_scale_min = 0.16 is above data.augment.crop_scale_max = 0.1"),
        ("data.augment.crop_ratio_min=2.0", r"data.augment.crop_ratio_min = 2.0 is above data.augment.crop_ratio_max"),
        ("pretrain.augment.blur_sigma_min=3.0", r"pretrain.augment.blur_sigma_min = 3.0 is above"),
        ("basis.sd_grad=half", r"basis.sd_grad .*'half' is not one of 'full', 'damped'"),
    ],
)
def test_bad_method_values_fail_at_load(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])
