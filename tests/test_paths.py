import pytest

from addsr_pl.paths import config_dir


def test_config_dir_finds_the_repository_tree():
    assert (config_dir() / "train.yaml").is_file()


def test_config_dir_names_the_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("ADDSR_PL_CONF", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="train.yaml"):
        config_dir()
