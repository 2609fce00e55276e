"""Config loading, and the trainer's refusal of bad input: exit 2, one message, nothing written."""
import dataclasses

import pytest

from conftest import ROOT, SHARED_DATA, horovodrun, python
from distbn.config import Config, ConfigError, load_config


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


def test_shipped_configs_load():
    for name in ("lenet_syncbn", "lenet_gluonbn", "smoke", "resnet18_syncbn", "resnet18_syncbn_bf16"):
        cfg = load_config(str(ROOT / "configs" / f"{name}.yaml"))
        assert cfg.name == name
    book = load_config(str(ROOT / "configs" / "lenet_syncbn.yaml"))
    assert (book.train.lr, book.train.epochs, book.train.batch_size, book.model.bn) == (1.0, 5, 256, "sync")
    assert load_config(str(ROOT / "configs" / "lenet_gluonbn.yaml")).model.bn == "gluon"
    zoo = load_config(str(ROOT / "configs" / "resnet18_syncbn.yaml"))
    assert (zoo.model.arch, zoo.model.bn, book.model.arch) == ("resnet18_v1", "sync", "lenet")


def test_overrides_and_frozen(tmp_path):
    cfg = load_config(write(tmp_path, "train: {lr: 2}\n"),
                      ["train.epochs=3", "model.bn=custom", "data.limit=100", "data.dir=null"])
    assert (cfg.train.lr, cfg.train.epochs, cfg.model.bn, cfg.data.limit) == (2.0, 3, "custom", 100)
    assert isinstance(cfg.train.lr, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 3.0
    assert load_config(None) == Config()


@pytest.mark.parametrize("text, overrides, message", [
    ("train: {lrr: 1}\n", [], "unknown key train.lrr"),
    ("trian: {}\n", [], "unknown key trian"),
    ("train: {lr: fast}\n", [], "train.lr: expected float, got str"),
    ("train: {epochs: 2.5}\n", [], "train.epochs: expected int, got float"),
    ("train: {epochs: true}\n", [], "train.epochs: expected int, got bool"),
    ("train: {lr: -1}\n", [], "train.lr must be a positive finite number"),
    ("train: {lr: 0}\n", [], "train.lr must be a positive finite number"),
    ("train: {epochs: 0}\n", [], "train.epochs must be at least 1"),
    ("train: {batch_size: -4}\n", [], "train.batch_size must be at least 1"),
    ("model: {bn: batch}\n", [], "model.bn must be one of sync, custom, gluon, none"),
    ("model: {arch: resnet19}\n", [], "model.arch must be lenet or a mxnet.gluon.model_zoo"),
    ("model: {arch: resnet18_v1, bn: none}\n", [], "model.bn none is for lenet only"),
    ("train: 5\n", [], "train.: expected a mapping"),
    ("", ["train.lr"], "--set takes KEY=VALUE"),
    ("", ["train.nope=1"], "unknown key train.nope"),
])
def test_bad_values_name_the_key(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text), overrides)
    assert message in str(e.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "train: [1, 2\n"))


# --- the command line --------------------------------------------------------------------

BAD = [
    (["--set", "train.lrr=1"], "unknown key train.lrr"),
    (["--set", "train.lr=-1"], "train.lr must be a positive finite number"),
    (["--set", "model.bn=batch"], "model.bn must be one of"),
    (["--set", "model.arch=densenet121"], "model.arch densenet121 does not take 1x28x28 input"),
    (["--config", "configs/nope.yaml"], "cannot read config file configs/nope.yaml"),
]


@pytest.mark.parametrize("args, message", BAD)
def test_cli_bad_config_exits_2_with_one_message_and_writes_nothing(tmp_path, args, message):
    run_dir = tmp_path / "run"
    base = ["-m", "distbn.train", "--run-dir", str(run_dir)]
    if "--config" not in args:
        base += ["--config", "configs/smoke.yaml"]
    code, out = python(base + args, env={"DISTBN_DATA_DIR": str(SHARED_DATA)}, check=False, timeout=60)
    assert code == 2, out
    assert out.count("distbn.train: error:") == 1 and message in out, out
    assert "Traceback" not in out
    assert not run_dir.exists()


def test_cli_missing_data_says_where_it_looked(tmp_path):
    run_dir = tmp_path / "run"
    env = {"DISTBN_DATA_DIR": str(tmp_path / "empty"), "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "DISTBN_DATA_URL": "http://127.0.0.1:9/",
           "DISTBN_SYSTEM_DATA_DIR": str(tmp_path / "no-system-copy")}  # Debian's may be here
    code, out = python(["-m", "distbn.train", "--config", "configs/smoke.yaml", "--run-dir",
                        str(run_dir)], env=env, check=False, timeout=60)
    assert code == 2 and "apt-get install dataset-fashion-mnist" in out and str(tmp_path / "empty") in out
    assert not run_dir.exists()


@pytest.mark.multiproc
@pytest.mark.parametrize("args, message", [
    (["--set", "train.lrr=1"], "unknown key train.lrr"),
    (["--set", "train.batch_size=63"], "train.batch_size 63 is not divisible by the 2 workers"),
])
def test_cli_bad_config_under_horovodrun_is_reported_once(tmp_path, args, message):
    run_dir = tmp_path / "run"
    code, out = horovodrun(2, ["-m", "distbn.train", "--config", "configs/smoke.yaml",
                               "--run-dir", str(run_dir), *args],
                           env={"DISTBN_DATA_DIR": str(SHARED_DATA)}, check=False, timeout=60)
    assert code != 0, out
    assert out.count(message) == 1, out
    assert not run_dir.exists()


def test_precision_must_be_known():
    with pytest.raises(ConfigError, match="train.precision must be one of float32, bfloat16, float16"):
        load_config(None, ["train.precision=fp8"])


@pytest.mark.parametrize("precision, gpu, probe, why", [
    ("float32", False, "no AVX-512", None),
    ("float16", True, None, None),
    ("bfloat16", False, None, None),
    ("float16", False, None, "float16 trains on GPUs only"),
    ("bfloat16", True, None, "on GPUs use float16"),
    ("bfloat16", False, "no AVX-512", "bfloat16 cannot run here: no AVX-512; use float32"),
])
def test_where_each_precision_can_train(precision, gpu, probe, why):
    """``probe``: what distbn.hardware's bfloat16 probe said (None: it runs)."""
    from distbn.precision import unsupported
    got = unsupported(precision, gpu, probe)
    assert (got is None) if why is None else (why in got), got


def test_defaults_are_the_lenet_syncbn_config():
    """``python -m distbn.train`` with no --config trains these settings."""
    assert load_config(None) == load_config(str(ROOT / "configs" / "lenet_syncbn.yaml"))


def test_api_page_lists_every_public_name():
    import distbn
    page = (ROOT / "docs" / "api.md").read_text()
    missing = [name for name in distbn.__all__ if f"distbn.{name}" not in page]
    assert not missing, missing
