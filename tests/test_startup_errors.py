"""Bad start-up input is one line naming the file, exit code 2, and nothing written: an
empty or binary config, a directory where a file is expected, a CSV that does not parse."""

from __future__ import annotations

import json

import pytest

from codistill.cli import main


def _train(capsys, tmp_path, config, *sets):
    out = tmp_path / "run"
    code = main(["train", str(config), "--out", str(out), "--no-progress", *sets])
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("codistill: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert not out.exists(), "a refused start must leave no run directory"
    return errors[0]


@pytest.mark.parametrize(("name", "content", "needle"), [
    ("empty.yaml", b"", "the config file is empty"),
    ("comments.yaml", b"# steps: 10\n\n", "the config file is empty"),
    ("weights.yaml", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not a YAML text file (byte 0 is not UTF-8)"),
    ("nul.yaml", b"steps: 1\x00\n", "not valid YAML: unacceptable character #x0000"),
])
def test_a_config_file_that_is_empty_or_not_text_is_named(capsys, tmp_path, name, content, needle):
    path = tmp_path / name
    path.write_bytes(content)
    line = _train(capsys, tmp_path, path)
    assert str(path) in line and needle in line, line


def test_an_explicitly_empty_mapping_still_means_every_default(tmp_path):
    from codistill.config import RunConfig, load_config

    (tmp_path / "defaults.yaml").write_text("{}\n")
    assert load_config(str(tmp_path / "defaults.yaml")).steps == RunConfig().steps


def test_a_directory_given_as_the_config_is_named(capsys, tmp_path):
    folder = tmp_path / "configs"
    folder.mkdir()
    assert _train(capsys, tmp_path, folder) == f"codistill: error: {folder} is a directory, not a config file"


def test_a_directory_given_as_the_text_data_path_is_named(capsys, tmp_path, tiny_config):
    folder = tmp_path / "corpus"
    folder.mkdir()
    tiny_config["data"]["path"] = str(folder)
    (tmp_path / "c.yaml").write_text(json.dumps(tiny_config))
    line = _train(capsys, tmp_path, tmp_path / "c.yaml")
    assert line == f"codistill: error: data.path {str(folder)!r} is a directory, not a text file"


CLICK = ["--set", "task=click", "--set", "codistill.distill=bce", "--set", "model={}"]


def _click_table(tmp_path, tiny_config, path):
    (tmp_path / "c.yaml").write_text(json.dumps(tiny_config))
    data = json.dumps({"name": "table", "path": str(path), "label": "clicked", "numeric": ["a", "b"]})
    return tmp_path / "c.yaml", [*CLICK, "--set", f"data={data}"]


def test_a_directory_given_as_the_table_data_path_is_named(capsys, tmp_path, tiny_config):
    folder = tmp_path / "tables"
    folder.mkdir()
    config, sets = _click_table(tmp_path, tiny_config, folder)
    line = _train(capsys, tmp_path, config, *sets)
    assert line.startswith(f"codistill: error: {folder} is a directory, not a table file"), line


def test_a_csv_that_does_not_parse_names_the_file(capsys, tmp_path, tiny_config):
    table = tmp_path / "clicks.csv"
    table.write_text("a,b,clicked\n1,2,1\n3,4,5,6\n")
    config, sets = _click_table(tmp_path, tiny_config, table)
    line = _train(capsys, tmp_path, config, *sets)
    assert line == f"codistill: error: {table}: CSV parse error: Expected 3 columns, got 4: 3,4,5,6", line


def test_a_parquet_file_that_is_not_one_names_the_file(capsys, tmp_path, tiny_config):
    table = tmp_path / "clicks.parquet"
    table.write_bytes(b"not parquet at all")
    config, sets = _click_table(tmp_path, tiny_config, table)
    line = _train(capsys, tmp_path, config, *sets)
    assert str(table) in line, line
