"""One typed configuration for TOML files, --set overrides and tests."""

import pytest

from ctrscale.config import Config, ConfigError, load_config, save_config


def test_defaults_follow_the_cowclip_paper_where_fbgemm_allows():
    config = Config()
    assert config.model.name == "deepfm"
    assert config.model.dnn == [400, 400, 400]
    assert config.model.embedding_dim == 12  # paper's 10, rounded up to FBGEMM's multiple of 4
    assert config.model.init_std == 1e-2
    assert config.optim.embedding.lr == 1e-4
    assert config.optim.dense.lr == 8e-4


def test_toml_file_and_overrides_are_merged_and_typed(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[data]\ntrain = ["d/day=0"]\nbatch_size = 4096\n[model]\ndnn = [64, 32]\n')
    config = load_config(path, ["data.batch_size=8192", "model.name=dlrm", "optim.dense.lr=1e-3"])
    assert config.data.train == ["d/day=0"]
    assert config.data.batch_size == 8192
    assert config.model.dnn == [64, 32]
    assert config.model.name == "dlrm"
    assert config.optim.dense.lr == pytest.approx(1e-3)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["train.epohcs=3"], "train.epohcs"),
        (["data.batch_size=0"], "data.batch_size"),
        (["model.name=transformer"], "model.name"),
        (["model.embedding_dim=10"], "model.embedding_dim"),
        (["optim.embedding.lr=fast"], "optim.embedding.lr"),
        (["nosection.key=1"], "nosection"),
        (["data.shard_count=2", "data.shard_index=2"], "data.shard_index=2"),
        (["swap.replicas=1"], "swap.replicas"),
        (
            [
                "data.ramp_from_batch_size=1024",
                "data.ramp_steps=4",
                "train.warm_start_continue_data=true",
            ],
            "train.warm_start_continue_data",
        ),
    ],
)
def test_unknown_keys_and_invalid_values_name_the_key(overrides, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(None, overrides)


def test_malformed_override_and_missing_file_are_clear(tmp_path):
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        load_config(None, ["batch_size"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[data\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load_config(bad)


def test_saved_config_reads_back_identical(tmp_path):
    config = load_config(None, ["data.train=['a', 'b']", "train.max_steps=7", "model.dnn=[8]"])
    save_config(config, tmp_path / "config.toml")
    assert load_config(tmp_path / "config.toml") == config
