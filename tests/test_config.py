"""Run configuration: errors name the field; --set overrides; the CLI exits 2 on a bad config."""

from __future__ import annotations

import os

import pytest
import yaml

from codistill.cli import main
from codistill.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    dump_config,
    from_dict,
    load_config,
    parse_override,
)


def _write(path, values) -> str:
    path.write_text(yaml.safe_dump(values))
    return str(path)


def test_tiny_config_is_valid(tiny_config):
    cfg = from_dict(tiny_config)
    assert isinstance(cfg, RunConfig)
    assert (cfg.steps, cfg.replicas, cfg.batch_size) == (30, 2, 8)
    assert cfg.codistill.exchange_every == 5 and cfg.codistill.burn_in == 10
    assert cfg.data.seq_len == 32 and cfg.data.max_chars == 200000
    assert cfg.model == {"name": "lstm", "embed_dim": 16, "hidden_dim": 32}
    assert isinstance(cfg.optimizer.lr, float)
    assert from_dict({}).steps == RunConfig().steps


@pytest.mark.parametrize(
    "section,key,suggestion",
    [(None, "stepz", "steps"), ("codistill", "exchange_evry", "codistill.exchange_every"),
     ("eval", "max_batch", "eval.max_batches")],
)
def test_unknown_field_is_named_with_a_suggestion(tiny_config, section, key, suggestion):
    (tiny_config[section] if section else tiny_config)[key] = 1
    name = f"{section}.{key}" if section else key
    with pytest.raises(ConfigError, match=rf"unknown config field '{name}'.*did you mean '{suggestion}'"):
        from_dict(tiny_config)


def test_unknown_field_without_close_match(tiny_config):
    tiny_config["zzzqqq"] = 1
    with pytest.raises(ConfigError, match="'zzzqqq'") as info:
        from_dict(tiny_config)
    assert "did you mean" not in str(info.value)


@pytest.mark.parametrize(
    "path,value,field",
    [("steps", "ten", "steps"), ("data.seq_len", 1.5, "data.seq_len"),
     ("codistill.alpha", "high", "codistill.alpha"), ("seed", True, "seed"),
     ("replica_models", [{"name": "lstm"}, 3], r"replica_models\[1\]"),
     ("data", 7, "data")],
)
def test_wrong_type_is_named(tiny_config, path, value, field):
    *parents, last = path.split(".")
    node = tiny_config
    for p in parents:
        node = node[p]
    node[last] = value
    with pytest.raises(ConfigError, match=field) as info:
        from_dict(tiny_config)
    if isinstance(value, str):
        assert repr(value) in str(info.value)


@pytest.mark.parametrize(
    "section,key,value",
    [("codistill", "exchange_every", 0), ("codistill", "alpha", -0.5), ("codistill", "burn_in", -1),
     (None, "steps", 0), ("optimizer", "lr", 0.0), ("data", "val_fraction", 0.7),
     ("eval", "max_batches", -2)],
)
def test_out_of_range_is_named(tiny_config, section, key, value):
    (tiny_config[section] if section else tiny_config)[key] = value
    name = f"{section}.{key}" if section else key
    with pytest.raises(ConfigError, match=rf"^{name} must be"):
        from_dict(tiny_config)


@pytest.mark.parametrize(
    "section,key,value",
    [("data", "level", "char"), ("data", "shards", "overlapping"), ("optimizer", "name", "lamb"),
     ("codistill", "distill", "mse")],
)
def test_bad_choice_is_named(tiny_config, section, key, value):
    tiny_config[section][key] = value
    with pytest.raises(ConfigError, match=rf"{section}.{key} must be one of .*'{value}'"):
        from_dict(tiny_config)


def test_replica_models_length_mismatch(tiny_config):
    tiny_config["replica_models"] = [{"hidden_dim": 16}]
    with pytest.raises(ConfigError, match="replica_models has 1 entries but replicas is 2"):
        from_dict(tiny_config)


def test_replica_models_merge_over_model(tiny_config):
    tiny_config["replica_models"] = [{"hidden_dim": 8}, {"name": "transformer", "dim": 16}]
    cfg = from_dict(tiny_config)
    assert cfg.replica_model(0) == {"name": "lstm", "embed_dim": 16, "hidden_dim": 8}
    assert cfg.replica_model(1) == {"name": "transformer", "dim": 16}


def test_parse_override_values_are_yaml():
    assert parse_override("codistill.alpha=0.5") == (["codistill", "alpha"], 0.5)
    assert parse_override("steps=12") == (["steps"], 12)
    assert parse_override("data.path=null") == (["data", "path"], None)
    assert parse_override("name=a=b") == (["name"], "a=b")
    assert parse_override("replica_models=[{hidden_dim: 8}, {}]") == (
        ["replica_models"], [{"hidden_dim": 8}, {}])
    for bad in ("steps", "=3"):
        with pytest.raises(ConfigError, match="key=value"):
            parse_override(bad)


def test_apply_overrides_nested(tiny_config):
    out = apply_overrides(tiny_config, ["codistill.alpha=0.5", "steps=7", "model.hidden_dim=64",
                                        "optimizer.schedule=cosine", "new.deep.key=1"])
    assert out is tiny_config
    assert tiny_config["codistill"] == {"alpha": 0.5, "burn_in": 10, "exchange_every": 5, "distill": "kl"}
    assert tiny_config["steps"] == 7 and tiny_config["model"]["hidden_dim"] == 64
    assert tiny_config["model"]["embed_dim"] == 16
    assert tiny_config["optimizer"] == {"name": "adam", "lr": 0.003, "schedule": "cosine"}
    assert tiny_config["new"] == {"deep": {"key": 1}}
    with pytest.raises(ConfigError, match="steps is not a mapping"):
        apply_overrides(tiny_config, ["steps.x=1"])


def test_load_config_with_overrides(tiny_config, tmp_path):
    path = _write(tmp_path / "c.yaml", tiny_config)
    cfg = load_config(path, ["codistill.exchange_every=7", "eval.max_batches=2", "data.level=word"])
    assert cfg.codistill.exchange_every == 7 and cfg.eval.max_batches == 2 and cfg.data.level == "word"
    assert cfg.codistill.burn_in == 10  # untouched siblings survive
    with pytest.raises(ConfigError, match="codistill.exchange_every"):
        load_config(path, ["codistill.exchange_every=0"])
    with pytest.raises(ConfigError, match="codistill.exchange_evry"):
        load_config(path, ["codistill.exchange_evry=3"])
    assert load_config(None, ["steps=3"]).steps == 3


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(tmp_path / "bad.yaml"))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(str(tmp_path / "list.yaml"))


def test_dump_and_load_roundtrip(tiny_config, tmp_path):
    tiny_config["replica_models"] = [{}, {"hidden_dim": 8}]
    cfg = from_dict(tiny_config)
    dump_config(cfg, str(tmp_path / "config.yaml"))
    assert load_config(str(tmp_path / "config.yaml")).to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    "edit,sets,field",
    [(("codistill", "exchange_evry", 5), [], "codistill.exchange_evry"),
     (("data", "level", "char"), [], "data.level"),
     (None, ["codistill.exchange_every=0"], "codistill.exchange_every"),
     (None, ["steps=ten"], "steps")],
)
def test_cli_train_bad_config_exits_2_naming_the_field(tiny_config, tmp_path, capsys, edit, sets, field):
    if edit:
        section, key, value = edit
        tiny_config[section][key] = value
    path = _write(tmp_path / "bad.yaml", tiny_config)
    out = tmp_path / "run"
    argv = ["train", path, "--out", str(out), "--no-progress"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error" in err and field in err
    assert not os.path.exists(out)  # nothing was started


def test_cli_bad_model_setting_exits_2(tiny_config, tmp_path, capsys):
    tiny_config["model"]["hidden_size"] = 8
    path = _write(tmp_path / "bad.yaml", tiny_config)
    assert main(["train", path, "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    assert "model.hidden_size" in capsys.readouterr().err


@pytest.mark.parametrize("section,key,value,message", [
    (None, "steps", 0, "steps must be > 0, got 0"),
    ("codistill", "burn_in", -1, "codistill.burn_in must be >= 0, got -1"),
    ("data", "val_fraction", 0.7, "data.val_fraction must be < 0.5, got 0.7"),
    ("data", "seq_len", -3, "data.seq_len must be > 0, got -3"),
    ("optimizer", "name", "lamb", "optimizer.name must be one of ['adam', 'adamw', 'sgd'], got 'lamb'"),
    ("checkpoint", "every", -1, "checkpoint.every must be >= 0, got -1"),
])
def test_rule_messages(tiny_config, section, key, value, message):
    (tiny_config.setdefault(section, {}) if section else tiny_config)[key] = value
    with pytest.raises(ConfigError) as info:
        from_dict(tiny_config)
    assert str(info.value) == message


def test_task_defaults_model_data_and_distill_kind(tiny_config):
    from codistill.tasks.lm import LMData, LMTask

    cfg = from_dict({})
    assert cfg.task == "lm" and isinstance(cfg.data, LMData) and cfg.data == LMData()
    assert cfg.model == LMTask.default_model and cfg.model is not LMTask.default_model
    assert cfg.codistill.distill == "kl"  # "auto" resolved for a categorical task
    tiny_config["codistill"]["distill"] = "ce"
    assert from_dict(tiny_config).codistill.distill == "ce"
    del tiny_config["codistill"]["distill"]
    assert from_dict(tiny_config).codistill.distill == "kl"
    assert from_dict({"task": "codistill.tasks.lm:LMTask"}).model == LMTask.default_model


def test_cli_distill_kind_that_does_not_fit_the_task_exits_2(tiny_config, tmp_path, capsys):
    path = _write(tmp_path / "c.yaml", tiny_config)
    out = tmp_path / "run"
    assert main(["train", path, "--out", str(out), "--no-progress", "--set", "codistill.distill=bce"]) == 2
    err = capsys.readouterr().err
    assert "codistill.distill" in err and "'bce'" in err
    assert main(["train", path, "--out", str(out), "--no-progress", "--set", "task=nope"]) == 2
    assert "task must be one of" in capsys.readouterr().err
    assert not os.path.exists(out)
