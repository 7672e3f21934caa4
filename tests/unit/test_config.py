"""Config layering and every error path of slade_dist.config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from slade_dist.config import (
    DEFAULTS_FILE,
    Config,
    ConfigError,
    PseudoConfig,
    check_section,
    defaults_yaml,
    load_config,
    parse_override,
    valid_keys,
)


def write(tmp_path: Path, name: str, body: dict) -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(body))
    return p


def test_defaults_file_is_the_one_the_schema_writes():
    """configs/defaults.yaml is generated from the dataclasses (defaults and help text live once, in
    slade_dist/config.py): it must be exactly what `show-config --defaults` writes."""
    assert DEFAULTS_FILE.read_text() == defaults_yaml(), (
        "configs/defaults.yaml differs from the schema; regenerate it: "
        "python -m slade_dist show-config --defaults > configs/defaults.yaml"
    )
    assert load_config().to_dict() == Config().to_dict()
    text = DEFAULTS_FILE.read_text()
    for key in valid_keys():  # every leaf with its help text, the job shape's keys in a commented example
        assert key.split(".")[-1] + ":" in text, f"{key} missing from configs/defaults.yaml"
    assert "  samples_per_class: 4  # K of the labeled P x K batch\n" in text  # the help, beside its key


def test_layering_defaults_runfile_overrides(tmp_path):
    run = write(tmp_path, "run.yaml", {"train": {"lr": 0.01, "teacher_steps": 7}, "model": {"embed_dim": 32}})
    cfg = load_config(run, ["train.lr=0.5", "eval.recall_k=[1,5]", "mining.enabled=false"])
    assert cfg.train.lr == 0.5  # command line beats run file
    assert cfg.train.teacher_steps == 7  # run file beats defaults
    assert cfg.model.embed_dim == 32
    assert cfg.train.student_steps == Config().train.student_steps  # untouched default
    assert cfg.eval.recall_k == [1, 5] and cfg.mining.enabled is False
    assert cfg.source_of("train.lr") == "command line"
    assert cfg.source_of("train.teacher_steps") == str(run)
    assert cfg.source_of("train.warmup_steps").endswith("defaults.yaml")


def test_int_accepted_for_float_and_nested_launch_shape(tmp_path):
    run = write(
        tmp_path, "r.yaml", {"train": {"lr": 1}, "launch": {"shapes": {"student": {"nodes": 8, "gpus_per_node": 8}}}}
    )
    cfg = load_config(run)
    assert isinstance(cfg.train.lr, float) and cfg.train.lr == 1.0
    assert cfg.launch.shapes["student"].nodes == 8 and "teacher" not in cfg.launch.shapes


def test_a_run_dir_config_with_the_old_launch_stage_keys_loads_as_launch_shapes(tmp_path):
    old = {
        "launch": {"student": {"nodes": 4}, "cluster_job": {"gpus_per_node": 2}, "shapes": {"student": {"nodes": 8}}}
    }
    run = write(tmp_path, "config.yaml", old)
    with pytest.warns(UserWarning) as caught:
        cfg = load_config(run, ["launch.teacher.time_min=5"])
    said = sorted(str(w.message) for w in caught)
    assert f"launch.cluster_job (from {run}) is the old spelling of launch.shapes.cluster: read as that" in said
    assert len(said) == 3 and "launch.teacher (from command line) is the old spelling" in said[2]
    assert cfg.launch.shapes["student"].nodes == 8  # the new spelling wins where both are set
    assert cfg.launch.shapes["cluster"].gpus_per_node == 2 and cfg.launch.shapes["teacher"].time_min == 5
    assert cfg.source_of("launch.shapes.teacher.time_min") == "command line"
    assert cfg.source_of("launch.shapes.cluster.gpus_per_node") == str(run)


def test_unknown_key_suggests_closest(tmp_path):
    run = write(tmp_path, "r.yaml", {"train": {"teacher_stpes": 5}})
    with pytest.raises(ConfigError) as e:
        load_config(run)
    msg = str(e.value)
    assert "train.teacher_stpes" in msg and "train.teacher_steps" in msg and str(run) in msg


def test_unknown_section_and_misplaced_leaf():
    with pytest.raises(ConfigError, match=r"'trian.lr'.*did you mean 'train.lr'"):
        load_config(None, ["trian.lr=3"])
    with pytest.raises(ConfigError, match=r"did you mean .*'train.teacher_steps'"):
        load_config(None, ["teacher_steps=3"])


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("train.lr=abc", r"train.lr \(from command line\): expected a number"),
        ("train.teacher_steps=1.5", r"expected an integer"),
        ("train.teacher_steps=true", r"expected an integer"),
        ("mining.enabled=3", r"expected true/false"),
        ("loss.name=triplet", r"'triplet' is not one of 'ms', 'contrastive'"),
        ("eval.recall_k=5", r"expected a list"),
        ("eval.recall_k=[1,x]", r"eval.recall_k\[1\]"),
        ("train.zero_stage=4", r"above the maximum 3"),
        ("basis.beta=-0.1", r"below the minimum 0"),
        ("model=3", r"model .*must be a mapping"),
        ("train.lr=.nan", r"train.lr \(from command line\): nan is not a finite number"),
        ("basis.margin=.inf", r"basis.margin .*inf is not a finite number"),
        ("eval.recall_k=[0,-1]", r"eval.recall_k .*0 is below the minimum 1"),
        ("eval.recall_k=[]", r"eval.recall_k \(from command line\) must not be empty"),
        ("run.dir=", r"run.dir \(from command line\) must not be empty"),
        ("model.backbone=resnet9000", r"unknown backbone 'resnet9000'; choose one of resnet50, resnet18, tiny_cnn"),
        ("data.augment.crop_ratio_min=2", r"data.augment.crop_ratio_min = 2.0 is above data.augment.crop_ratio_max"),
        ("data.augment.crop_scale_max=0.1", r"data.crop_scale_min = 0.16 is above data.augment.crop_scale_max = 0.1"),
        ("pretrain.local_crop_scale_min=0.5", r"local_crop_scale_min = 0.5 is above pretrain.local_crop_scale_max"),
    ],
)
def test_bad_values_name_key_and_source(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def test_bad_type_in_file_names_file(tmp_path):
    run = write(tmp_path, "r.yaml", {"pseudo": {"k": "many"}})
    with pytest.raises(ConfigError, match=rf"pseudo.k \(from {run}\): expected an integer"):
        load_config(run)


def test_missing_input_path_fails_at_load(tmp_path):
    run = write(tmp_path, "r.yaml", {"data": {"train_shards": str(tmp_path / "nope")}})
    with pytest.raises(ConfigError, match=rf"data.train_shards \(from {run}\): input path .*nope.* does not exist"):
        load_config(run)
    (tmp_path / "nope").mkdir()
    assert load_config(run).data.train_shards == str(tmp_path / "nope")
    assert load_config(write(tmp_path, "s.yaml", {"data": {"unlabeled_shards": "/x/y"}}), check_paths=False)


def test_require_inputs_for_stage():
    cfg = load_config()
    with pytest.raises(ConfigError, match="data.train_shards must be set"):
        cfg.require_inputs("data.train_shards")


def test_bad_files():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("configs/nope.yaml")


def test_bad_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    p.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(p)


def test_override_syntax():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a.b=[1, 2]") == ("a.b", [1, 2])
    assert parse_override("a.b=") == ("a.b", "")
    with pytest.raises(ConfigError, match="section.key=value"):
        parse_override("train.lr")


def test_hash_and_saved_config_round_trip(tmp_path):
    a = load_config(None, ["train.lr=0.5"])
    b = load_config(None, ["train.lr=0.5", "launch.shapes.teacher.nodes=4"])
    c = load_config(None, ["train.lr=0.25"])
    assert a.hash() == b.hash() != c.hash()  # the job shape is not part of the work's identity
    assert len(a.hash()) == 12
    assert a.section_hash(["model"]) == c.section_hash(["model"])
    saved = a.save(tmp_path / "out" / "config.yaml")
    again = load_config(saved)
    assert again.to_dict() == a.to_dict() and again.hash() == a.hash()
    assert a.hash() in saved.read_text()


def test_every_run_file_loads():
    for f in sorted(Path("configs").glob("*.yaml")):
        load_config(f, check_paths=False)


def test_pk_larger_than_the_classes_fails_at_load(tmp_path):
    shards = tmp_path / "train"
    shards.mkdir()
    (shards / "classes.json").write_text('{"0": "a", "1": "b", "2": "c"}')
    ok = load_config(None, [f"data.train_shards={shards}", "train.classes_per_batch=3"])
    assert ok.train.classes_per_batch == 3
    with pytest.raises(
        ConfigError,
        match=r"train.classes_per_batch .* = 4, but .*classes.json lists only 3 "
        r"classes.*<= 3",
    ):
        load_config(None, [f"data.train_shards={shards}", "train.classes_per_batch=4"])


def test_backbone_names_match_the_registry():
    from slade_dist.config import BACKBONE_NAMES
    from slade_dist.models.backbones import BACKBONES

    assert set(BACKBONES) == set(BACKBONE_NAMES)


def test_model_pretrained_path_spellings_are_one_work_and_conflicts_fail(tmp_path):
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    new = load_config(None, [f"model.pretrained={weights}"])
    old = load_config(None, [f"model.pretrained_path={weights}"])
    assert new.model.pretrained == "none" and new.model.pretrained_path == str(weights)
    assert new.hash() == old.hash()  # the same work, whichever key names the file
    assert load_config(new.save(tmp_path / "saved.yaml")).hash() == new.hash()  # a saved config reloads
    both = r"model.pretrained='hub' and model.pretrained_path=.* both set.*command line"
    with pytest.raises(ConfigError, match=both):
        load_config(None, ["model.backbone=timm:test_vit", "model.pretrained=hub", f"model.pretrained_path={weights}"])
    with pytest.raises(ConfigError, match="model.pretrained=hub loads a timm model's published weights.*'resnet50'"):
        load_config(None, ["model.pretrained=hub"])
    with pytest.raises(ConfigError, match=r"model.pretrained_path \(from command line, as model.pretrained\).*nope"):
        load_config(None, [f"model.pretrained={tmp_path / 'nope.pth'}"])
    hub = load_config(None, ["model.backbone=timm:vit_small_patch14_dinov2.lvd142m", "model.pretrained=hub"])
    assert hub.model.pretrained == "hub" and hub.model.pretrained_path == ""


def test_swav_backbone_lr_mult_follows_the_start_unless_set(tmp_path):
    from slade_dist.config import swav_backbone_lr_mult

    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    assert load_config(None, []).pretrain.backbone_lr_mult is None  # auto by default
    assert swav_backbone_lr_mult(load_config(None, []))[0] == 1.0  # random weights: train the backbone
    assert swav_backbone_lr_mult(load_config(None, [f"model.pretrained={weights}"]))[0] == 0.1
    hub = ["model.backbone=timm:test_vit", "model.pretrained=hub"]
    assert swav_backbone_lr_mult(load_config(None, hub))[0] == 0.1
    assert swav_backbone_lr_mult(load_config(None, [*hub, "pretrain.backbone_lr_mult=0.5"])) == (
        0.5,
        "pretrain.backbone_lr_mult",
    )


def test_a_section_built_in_code_gets_the_load_checks():
    check_section(PseudoConfig(), "pseudo")
    check_section(dataclasses.replace(PseudoConfig(), two_level=True), "pseudo")  # YAML's bare `on`
    with pytest.raises(ConfigError, match=r"pseudo.k \(from code\): 0 is below the minimum"):
        check_section(dataclasses.replace(PseudoConfig(), k=0), "pseudo")
    with pytest.raises(ConfigError, match=r"pseudo.init \(from code\): 'x' is not one of"):
        check_section(dataclasses.replace(PseudoConfig(), init="x"), "pseudo")
