from pathlib import Path

import pytest

from medvit.config import dump_config, load_config, parse_config
from medvit.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
MINIMAL = {"labels": {0: "background", 1: "liver"}, "model": {"name": "unetr"}}


def test_defaults_fill_out_channels_from_labels():
    cfg = parse_config({"labels": {0: "bg", 1: "a", 4: "b"}, "model": {"name": "unetr"}})
    assert cfg.model.out_channels == 5
    assert cfg.preprocess.orientation == "RAS"
    assert cfg.infer.overlap == 0.5


def test_round_trip_through_dump():
    cfg = parse_config({**MINIMAL, "preprocess": {"spacing": [1, 1, 2], "intensity": {"modality": "mri"}}})
    again = parse_config(dump_config(cfg))
    assert again == cfg


@pytest.mark.parametrize(
    "patch, key",
    [
        ({"foo": 1}, "unknown key 'foo'"),
        ({"model": {"name": "unetr", "roi": [1, 2, 3]}}, "unknown key 'model.roi'"),
        ({"model": {"name": "unetr", "roi_size": "big"}}, "model.roi_size"),
        ({"preprocess": {"spacing": [1, 1, -2]}}, "preprocess.spacing"),
        ({"preprocess": {"orientation": "RRS"}}, "preprocess.orientation"),
        ({"preprocess": {"intensity": {"modality": "pet"}}}, "preprocess.intensity.modality"),
        ({"preprocess": {"intensity": {"modality": "ct", "window": [300, -100]}}}, "preprocess.intensity"),
        ({"train": {"datalist": "x.json", "epochs": "many"}}, "train.epochs"),
        ({"infer": {"overlap": 1.0}}, "infer.overlap"),
        ({"labels": {1: "liver"}}, "background"),
        ({"model": {"name": "unetr", "out_channels": 1}}, "model.out_channels"),
    ],
)
def test_bad_values_name_the_key(patch, key):
    with pytest.raises(ConfigError) as e:
        parse_config({**MINIMAL, **patch}, "cfg.yaml")
    msg = str(e.value)
    assert msg.startswith("cfg.yaml: ") and key in msg and "\n" not in msg


@pytest.mark.parametrize(
    "patch, key",
    [
        ({"train": {"datalist": "x.json", "epochs": True}}, "train.epochs"),
        ({"train": {"datalist": "x.json", "lr": False}}, "train.lr"),
        ({"model": {"name": "unetr", "roi_size": [96, True, 96]}}, "model.roi_size"),
    ],
)
def test_yaml_booleans_are_not_numbers(patch, key):
    # YAML reads yes/no/true as booleans, which pydantic alone would take as 1 and 0
    with pytest.raises(ConfigError, match=f"key '{key}'.*not a boolean"):
        parse_config({**MINIMAL, **patch}, "cfg.yaml")


def test_boolean_fields_and_net_options_still_take_booleans():
    cfg = parse_config({**MINIMAL, "model": {"name": "unetr", "options": {"qkv_bias": True}},
                        "preprocess": {"intensity": {"modality": "ct", "clip": False}}})
    assert cfg.model.options == {"qkv_bias": True} and cfg.preprocess.intensity.clip is False


def test_missing_model_named():
    with pytest.raises(ConfigError, match="missing key 'model'"):
        parse_config({"labels": {0: "bg"}}, "cfg.yaml")


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("labels: {0: bg\nmodel: [")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "none.yaml")
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)


@pytest.mark.parametrize("text, needle", [
    ("labels: {0: bg, 1: a}\nmodel: {name: unetr}\ntrain: {datalist: x.json, epochs: 1, epochs: 500}\n",
     "line 3: key 'epochs' is given twice in one mapping"),
    ("labels: {0: bg, 1: a}\nmodel: {name: unetr}\nlabels: {0: bg, 1: b}\n", "line 3: key 'labels' is given twice"),
])
def test_a_key_given_twice_is_refused(tmp_path, text, needle):
    """PyYAML keeps the last silently: epochs 1 then 500 trained 500 epochs."""
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_config(p)


def test_two_labels_of_one_name_are_refused():
    """Validation scores are kept by name: the second 'a' hid the first from the mean Dice."""
    with pytest.raises(ConfigError) as e:
        parse_config({**MINIMAL, "labels": {0: "bg", 1: "a", 2: "a"}}, "cfg.yaml")
    assert str(e.value) == "cfg.yaml: labels 1 and 2 share the name 'a'; give each label its own name"


def test_relative_datalist_resolves_against_config_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    p = tmp_path / "sub" / "c.yaml"
    p.write_text("labels: {0: bg, 1: a}\nmodel: {name: unetr}\ntrain: {datalist: ../dl.json}\n")
    assert load_config(p).train.datalist == (tmp_path / "dl.json").resolve()


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_shipped_configs_validate(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.train is not None and cfg.train.datalist.is_file()


def test_too_few_values_in_a_tuple_field_says_so():
    with pytest.raises(ConfigError, match=r"key 'preprocess.spacing': too few values \(item 2, counting from 0, is missing\)"):
        parse_config({"labels": {0: "bg", 1: "a"}, "model": {"name": "unetr"}, "preprocess": {"spacing": [8, 8]}})


def test_a_folder_given_as_the_config_says_so(tmp_path):
    with pytest.raises(ConfigError, match="is a folder; give the config's YAML file"):
        load_config(tmp_path)
