"""Every command, given a user error (a bad flag value, a missing file, a wrong checkpoint), prints one line that
names the problem and exits with status 2: never a traceback. And Ctrl-C at any moment is one line too."""

import signal
import subprocess
import sys
import time

import pytest
import torch
import torchvision

from moco.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("files")
    (root / "notes.txt").write_text("not a checkpoint\n")
    torch.save({"epoch": 3, "weights": torch.zeros(2)}, root / "other.pt")
    net = torchvision.models.resnet18(weights=None)
    torch.save({"arch": "resnet18", "state_dict": {f"module.encoder_q.{k}": v for k, v in net.state_dict().items()}},
               root / "rgb.pth.tar")  # an official MoCo v2 layout: 3-channel, no recorded size
    (root / "run").mkdir()
    return root


def cases(f) -> list[list[str]]:
    missing = str(f / "missing.pt")
    return [
        ["pretrain", "--lr", "abc"],
        ["pretrain", "--temperature", "inf"],
        ["pretrain", "--arch", "vgg", "--print-config"],
        ["pretrain", "--config", str(f / "missing.yaml")],
        ["pretrain", "--dataset", "folder", "--data-root", str(f / "nowhere"), "--out-dir", str(f / "o")],
        ["pretrain", "--resume", missing],
        ["pretrain", "--precision", "fp16", "--device", "cpu", "--preset", "smoke", "--out-dir", str(f / "o")],
        ["pretrain", "--preset", "v9"],
        ["pretrain", "--device", "cuda:abc", "--print-config"],
        ["supervised", "--dataset", "cifar10", "--data-root", str(f / "nowhere"), "--out-dir", str(f / "o")],
        ["knn", missing],
        ["knn", str(f / "notes.txt")],
        ["knn", str(f / "other.pt")],
        ["knn", str(f / "rgb.pth.tar"), "--vote", "mean"],
        ["knn", str(f / "rgb.pth.tar"), "--k", "many"],
        ["knn", str(f / "rgb.pth.tar"), "--dataset", "digits", "--gray-to-rgb", "--device", "gpu"],
        ["knn", str(f / "run")],
        ["knn", str(f / "rgb.pth.tar"), "--dataset", "digits", "--no-baselines"],  # 3-channel encoder, gray data
        ["lincls", missing],
        ["lincls", str(f / "rgb.pth.tar"), "--dataset", "digits", "--epochs", "0"],
        ["embed", missing, "digits", "--out", str(f / "e.npy")],
        ["embed", str(f / "rgb.pth.tar"), "digits", "--out", str(f / "e.csv")],
        ["report", str(f / "nowhere")],
        ["report", str(f / "run")],
        ["export", missing, "--format", "torchvision", "--out", str(f / "x.pth")],
        ["export", str(f / "rgb.pth.tar"), "--format", "onnx", "--out", str(f / "x.onnx")],
        ["export", str(f / "rgb.pth.tar"), "--format", "detectron2", "--out", str(f / "x.pth")],
        ["finetune", "detect", missing],
        ["finetune", "detect", "random", "--norm", "group", "--iterations", "1"],
        ["finetune", "segment", "random", "--data", str(f / "nowhere.json")],
        ["finetune", "scenes", str(f / "scenes"), "--train-scenes", "0"],
        ["shard", str(f / "nowhere"), str(f / "shards")],
    ]


def test_every_command_answers_a_user_error_with_one_line_and_status_2(files, capsys):
    for argv in cases(files):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's usage errors, one line too (cli.flags.Parser)
            code = e.code
        err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("moco: warning:")]
        assert code == 2, (argv, code, err)
        assert len(err) == 1 and "error" in err[0] and err[0].startswith("moco"), (argv, err)
        assert "Traceback" not in err[0] and "weights_only" not in err[0], (argv, err)


def test_the_messages_name_the_problem(files, capsys):
    def error(*argv: str) -> str:
        try:
            main(list(argv))
        except SystemExit:
            pass
        return capsys.readouterr().err

    assert "is not a checkpoint" in error("knn", str(files / "notes.txt"))
    assert "--gray-to-rgb" in error("knn", str(files / "rgb.pth.tar"), "--dataset", "digits", "--no-baselines")
    assert "momentum-contrast moco-pretrain checkpoint" not in error("knn", str(files / "other.pt"))
    assert "unknown checkpoint layout" in error("knn", str(files / "other.pt"))


def test_an_rgb_release_evaluates_on_gray_images_at_a_size_it_says(files, capsys):
    argv = ["knn", str(files / "rgb.pth.tar"), "--dataset", "digits", "--gray-to-rgb", "--k", "5", "--no-baselines",
            "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "does not record its training size; evaluating at the data set's own size" in out
    assert "(moco-v1/v2)" in out and "at 8 px" in out
    assert main([*argv, "--image-size", "32"]) == 0
    assert "at 32 px" in capsys.readouterr().out


@pytest.mark.parametrize("delay", [0.3, 1.0, 2.0])
def test_ctrl_c_during_start_up_is_one_line(tmp_path, delay):
    p = subprocess.Popen([sys.executable, "-m", "moco", "pretrain", "--preset", "smoke", "--out-dir", str(tmp_path)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and err.strip().splitlines()[-1] == "moco: interrupted" and "Traceback" not in err, err
