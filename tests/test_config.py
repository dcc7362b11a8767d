"""Configuration errors surface at start-up, with the offending key named."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from ipt.config import ConfigError, register, to_object, validate

from .conftest import ROOT, run_pretrain, tiny_overrides

register()


def load(overrides: list[str]):
    with initialize_config_dir(str(ROOT / "configs"), version_base=None):
        return to_object(compose("pretrain", overrides=overrides))


def test_defaults_compose_into_the_typed_schema():
    cfg = load([])
    assert cfg.model.name == "tiny" and cfg.deepspeed.stage == 1


def test_unknown_key_is_rejected_with_its_name():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as e:
        load(["train.lr_max=1"])
    assert "lr_max" in str(e.value) + str(e.value.__cause__)


def test_wrong_type_is_rejected_with_its_name():
    with pytest.raises((ConfigCompositionException, ValidationError)) as e:
        load(["train.max_steps=many"])
    assert "max_steps" in str(e.value) + str(e.value.__cause__)


def test_batch_that_does_not_divide_is_rejected():
    cfg = load(["train.micro_batch_size=3", "train.global_batch_size=8"])
    with pytest.raises(ConfigError, match="global_batch_size=8 is not divisible"):
        validate(cfg, world_size=1)


def test_batch_divisibility_counts_ranks():
    cfg = load(["train.micro_batch_size=2", "train.global_batch_size=6"])
    with pytest.raises(ConfigError, match="2 ranks"):
        validate(cfg, world_size=2)


def test_missing_data_directory_is_named(tmp_path: Path):
    cfg = load([f"data.root={tmp_path}", f"tokenizer={tmp_path}"])
    with pytest.raises(ConfigError, match="data.sources.docstrings.path=.* does not exist"):
        validate(cfg, world_size=1)


def test_entry_point_reports_config_error_in_one_line(data_dir, tmp_path):
    proc = run_pretrain(tiny_overrides(data_dir, tmp_path / "r",
                                       **{"train.global_batch_size": 7}), check=False)
    assert proc.returncode == 2
    assert "ipt: error: train.global_batch_size=7" in proc.stderr
    assert not (tmp_path / "r" / "metrics.jsonl").exists()  # no step ran


@pytest.mark.parametrize("override", ["train.bogus=1", "+train.bogus=1"])
def test_entry_point_rejects_unknown_key(data_dir, tmp_path, override):
    proc = run_pretrain(tiny_overrides(data_dir, tmp_path / "r") + [override], check=False)
    assert proc.returncode != 0
    assert "bogus" in proc.stderr
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_own_sources_named_on_the_command_line_make_the_whole_mixture():
    cfg = load(["data=custom", "tokenizer=data/tok", "data.sources={web: {path: data/shards/web, "
                "weight: 0.8}, books: {path: data/shards/books, weight: 0.2}}"])
    assert {k: (v.path, v.weight) for k, v in cfg.data.sources.items()} == {
        "web": ("data/shards/web", 0.8), "books": ("data/shards/books", 0.2)}


def test_a_misspelled_key_of_an_own_source_is_named():
    with pytest.raises(ConfigError, match="data.sources.web.wieght"):
        load(["data=custom", "tokenizer=data/tok", "data.sources.web.path=x",
              "data.sources.web.wieght=0.5"])


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.decompose.min_len=48"], "min_len=48 and max_len=256 must be powers of two"),
    (["data.decompose.min_len=512"], "min_len <= max_len"),
    (["data.decompose.curriculum=grow"], "curriculum='grow' must be one of"),
    (["data.decompose.cycles=0"], "cycles=0 >= 1"),
    (["data.decompose.max_len=1024", "train.micro_batch_size=2"],
     "a micro-batch holds .* 512 tokens, which is not a whole number of .*max_len=1024"),
    (["data.decompose.max_len=512", "model.max_seq_len=256"], "max_len=512 exceeds model"),
    (["teacher=kd", "teacher.path=x", "teacher.kd_steps=5", "teacher.soft_labels=true"],
     "teacher.soft_labels=true reads soft labels stored per packed sequence"),
], ids=["min_len", "order", "curriculum", "cycles", "micro-batch", "model", "soft-labels"])
def test_dataset_decomposition_settings_are_checked(overrides, message):
    cfg = load(["data.packing=decompose", "data.seq_len=256", "model.max_seq_len=2048",
                "train.micro_batch_size=4", "train.global_batch_size=8", *overrides])
    with pytest.raises(ConfigError, match=message):
        validate(cfg, world_size=1)
