import pytest

from cfcml.config import ConfigError, build_config, config_from_dict, parse_overrides, preset_names


def test_presets_ship_as_package_data():
    assert {"men", "derm7pt", "men-smoke", "derm7pt-smoke"} <= set(preset_names())


def test_paper_presets_hold_the_paper_values():
    men, derm = build_config("men"), build_config("derm7pt")
    assert (men.model.n_image_tokens, men.model.n_tabular_tokens) == (48, 16)
    assert (derm.model.n_image_tokens, derm.model.n_tabular_tokens) == (32, 24)
    assert (men.loss.alpha, men.loss.beta, men.loss.gamma) == (0.06, 0.04, 0.24)
    assert (derm.loss.alpha, derm.loss.beta, derm.loss.gamma) == (0.04, 0.06, 0.18)
    assert men.train.lr == 5e-4 and derm.train.lr == 1e-4
    assert men.data.image_size == [24, 128, 128]


def test_overrides_are_parsed_as_yaml_and_type_checked():
    cfg = build_config(
        "men-smoke", ["train.lr=1e-3", "model.mg_cie=false", "model.sg_stage=3", "data.image_size=[8,16,16]"]
    )
    assert cfg.train.lr == 1e-3 and cfg.model.mg_cie is False and cfg.model.sg_stage == 3
    assert cfg.data.image_size == [8, 16, 16]
    assert parse_overrides(["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.mg_cie=maybe", "model.mg_cie: expected true/false"),
        ("model.n_image_tokens=1.5", "model.n_image_tokens: expected an integer"),
        ("model.token_mapping=mlp", "model.token_mapping: 'mlp' is not one of"),
        ("model.nope=1", "unknown key(s) ['model.nope']"),
        ("data.image_size=[8,16]", "the men cohort holds volumes, which need 3 sizes"),
        ("data.image_size=[0,16,16]", "data.image_size: sizes must lie in 1..8192"),
        ("train.lr", "--set expects key=value"),
        ("train.select_window=0", "train.select_window: expected >= 1"),
        ("train.threads=-1", "train.threads: expected 0 (torch's default)"),
        ("model.mamba_d_state=0", "model.mamba_d_state: expected >= 1"),
        ("train.lr=-1e-3", "train.lr: expected a learning rate > 0, got -0.001"),
        ("train.lr=.nan", "train.lr: expected a learning rate > 0, got nan"),
        ("train.epochs=0", "train.epochs: expected >= 1"),
        ("model.n_image_tokens=0", "model.n_image_tokens: expected 1..4096"),
        ("model.dropout=2", "model.dropout: expected a probability in [0, 1)"),
        ("data.aug_prob=-0.1", "data.aug_prob: expected a probability in [0, 1]"),
        ("loss.tau=0", "loss.tau: expected a temperature"),
        ("model.heads=3", "model.heads: 3 heads do not divide model.dim = 32"),
        ("train.device=gpu7", "train.device: 'gpu7' is not one of auto, cpu, cuda, cuda:N"),
        ("train.batch_size=100000", "train.batch_size: expected 2..4096"),
        ("data.num_folds=3", "unknown key(s) ['data.num_folds']"),
        ("train.select_metric=sen", "train.select_metric: 'sen' is not a metric of the men cohort"),
        ("dataset=nowhere.yaml", "dataset: dataset 'nowhere.yaml' is neither a built-in cohort"),
        ("dataset=derm7pt", "the preset men-smoke's encoder nnmamba3d reads volumes, but the derm7pt cohort"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=None) as e:
        build_config("men-smoke", [override])
    assert message in str(e.value)


def test_unimodal_switches_cannot_both_be_off():
    with pytest.raises(ConfigError, match="cannot both be false"):
        build_config("men-smoke", ["model.use_images=false", "model.use_tabular=false"])


def test_config_round_trips_through_a_dict():
    cfg = build_config("derm7pt-smoke", ["loss.ccrm=false"])
    assert config_from_dict(cfg.to_dict()) == cfg
