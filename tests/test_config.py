"""Config: presets, YAML, command-line flags, validation before any work starts."""

import pytest
from conftest import config_fields

from moco import config as C
from moco.cli import build_parser
from moco.cli.pretrain import resolve_pretrain_config
from moco.errors import ConfigError


def parse(*argv):
    return resolve_pretrain_config(build_parser(["pretrain", *argv]).parse_args(["pretrain", *argv]))


def test_every_preset_is_valid_and_the_papers_recipes_are_right():
    for name in C.PRESETS:
        C.validate(C.preset(name))
    v1, v2 = C.preset("v1"), C.preset("v2")
    assert (v1.model.queue_size, v1.model.key_momentum, v1.model.temperature, v1.model.head) == (65536, 0.999, 0.07, "linear")
    assert (v1.optim.lr, v1.optim.weight_decay, v1.optim.schedule, v1.optim.lr_steps) == (0.03, 1e-4, "step", [120, 160])
    assert (v2.model.temperature, v2.model.head, v2.data.augment, v2.optim.schedule) == (0.2, "mlp", "v2", "cosine")


def test_flags_override_the_yaml_file_which_overrides_the_preset(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("preset: v1\nmodel:\n  queue_size: 1024\n  temperature: 0.1\noptim:\n  lr: 0.5\n")
    cfg, resume = parse("--config", str(f), "--temperature", "0.3", "--lr-steps", "3", "4", "--no-shuffle-bn")
    assert cfg.preset == "v1" and cfg.model.arch == "resnet50"  # from the preset
    assert cfg.model.queue_size == 1024 and cfg.optim.lr == 0.5  # from the file
    assert cfg.model.temperature == 0.3 and cfg.optim.lr_steps == [3, 4] and cfg.model.shuffle_bn is False
    assert resume is None


def test_flat_yaml_fields_and_optional_values(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("queue_size: 2048\nimage_size: null\nthreads: 1\n")
    cfg, _ = parse("--config", str(f), "--hidden-dim", "none")
    assert cfg.model.queue_size == 2048 and cfg.data.image_size is None and cfg.run.threads == 1
    assert cfg.model.hidden_dim is None


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--key-momentum", "1.0"], r"key_momentum \(m\) must be in \[0, 1\)"),
        (["--key-momentum", "-0.1"], "key_momentum"),
        (["--temperature", "0"], r"temperature \(T\) must be > 0"),
        (["--arch", "vgg"], "choose one of small_cnn, resnet18"),
        (["--dataset", "imagenet"], "choose one of fashion-mnist"),
        (["--batch-size", "100"], "multiple of bn_splits=8"),
        (["--epochs", "0"], "epochs must be >= 1"),
        (["--dataset", "folder"], "needs data_root"),
        (["--device", "tpu"], "device='tpu' is unknown"),
        (["--warmup-epochs", "45"], "warmup_epochs"),
        (["--method", "simclr"], "method='simclr' is unknown; choose one of moco, end_to_end, memory_bank"),
        (["--method", "end_to_end", "--symmetric"], "symmetric loss is not implemented for method=end_to_end"),
        (["--precision", "fp8"], "precision='fp8' is unknown"),
        (["--depths", "1", "2"], r"depths must be 4 numbers >= 1 \(layers in each stage of small_cnn\), got \[1, 2\]"),
        (["--depths", "1", "0", "1", "1"], "depths must be 4 numbers >= 1"),
    ],
)
def test_configs_that_cannot_work_are_rejected_naming_the_field(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse(*argv)


@pytest.mark.parametrize("argv,message", [
    (["--lr", "abc"], "argument --lr: lr must be of type float, got 'abc'"),
    (["--temperature", "inf"], "argument --temperature: temperature must be a finite number, got 'inf'"),
    (["--lr-steps", "x"], "argument --lr-steps: lr_steps must be of type int, got 'x'"),
])
def test_a_bad_flag_value_is_one_line_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert err.startswith("moco pretrain: error: " + message) and "see moco pretrain --help" in err


def test_help_shows_the_defaults_of_the_chosen_preset(capsys):
    with pytest.raises(SystemExit):
        build_parser(["pretrain", "--help"]).parse_args(["pretrain", "--help"])
    cpu = capsys.readouterr().out
    assert "softmax temperature (default: 0.1)" in " ".join(cpu.split())  # the cpu preset's T, not the field's 0.2
    argv = ["pretrain", "--preset", "v1", "--help"]
    with pytest.raises(SystemExit):
        build_parser(argv).parse_args(argv)
    v1 = " ".join(capsys.readouterr().out.split())
    assert "softmax temperature (default: 0.07)" in v1 and "(default: resnet50)" in v1


def test_unknown_fields_and_presets_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset"):
        C.preset("v9")
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  queue: 3\n")
    with pytest.raises(ConfigError, match="unknown field 'queue' in config section 'model'"):
        parse("--config", str(f))
    f.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse("--config", str(f))
    with pytest.raises(ConfigError, match="does not exist"):
        parse("--config", str(tmp_path / "missing.yaml"))


def test_yaml_is_loaded_safely(tmp_path):
    f = tmp_path / "evil.yaml"
    marker = tmp_path / "pwned"
    f.write_text(f"!!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError):
        parse("--config", str(f))
    assert not marker.exists()


def test_config_round_trips_through_a_dict():
    cfg = C.apply_overrides(C.preset("cifar"), {"model": {"symmetric": True}, "lr_steps": [5]})
    assert C.from_dict(C.asdict(cfg)) == cfg


def test_every_config_field_has_a_flag_with_help():
    helps = {a.dest: a.help for a in build_parser()._subparsers._group_actions[0].choices["pretrain"]._actions}
    for name in config_fields():
        assert name in helps and len(helps[name]) > 15, name
