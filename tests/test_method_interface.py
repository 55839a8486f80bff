"""The method interface: a method written outside the package, through the public API only, trains with the
real trainer, checkpoints and resumes; every registered method compiles or is refused clearly."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moco import Method, apply_overrides, preset, pretrain, register
from moco.checkpoints import load_checkpoint
from moco.cli import main
from moco.errors import ConfigError
from moco.model import METHODS


@register("toy_batch_contrast")
class BatchContrast(Method):
    """A toy method: each query against every key of the batch (the positive on the diagonal), keys from the
    query encoder without gradient, and a temperature that this method anneals itself over training."""

    def __init__(self, encoder_q: nn.Module, T: float) -> None:
        super().__init__(encoder_q)
        self.T0 = T
        self.register_buffer("T", torch.tensor(T))  # (), saved in checkpoints: a resumed run must restore it
        self.progress: list[float] = []

    @classmethod
    def build(cls, cfg, encoder, num_images):
        return cls(encoder, cfg.temperature)

    def forward(self, x_q, x_k, index=None):
        q = F.normalize(self.encoder_q(x_q).float(), dim=1)  # (B, D)
        with torch.no_grad():
            k = F.normalize(self.encoder_q(x_k).float(), dim=1)  # (B, D)
        logits = q @ k.T / self.T  # (B, B)
        return logits, torch.arange(q.shape[0], device=q.device)  # (B, B), (B,)

    def before_step(self, progress: float) -> None:
        self.progress.append(progress)
        self.T.fill_(self.T0 * (1 + progress))

    def chance(self, batch_size: int) -> tuple[int, int]:
        return batch_size, 0


def toy_config(out_dir, epochs: int = 2):
    return apply_overrides(preset("smoke"), {
        "method": "toy_batch_contrast", "width": 4, "dim": 16, "bn_splits": 4, "batch_size": 64, "train_subset": 512,
        "epochs": epochs, "knn_every": -1, "progress": False, "tensorboard": False, "out_dir": str(out_dir)})


def test_a_method_defined_outside_the_package_trains_checkpoints_and_resumes(tmp_path):
    result = pretrain(toy_config(tmp_path / "straight"), baselines=False, echo=lambda s: None)
    full = load_checkpoint(result.checkpoint)
    assert full["step"] == 16 and full["config"]["model"]["method"] == "toy_batch_contrast"
    assert full["model"]["T"].item() == pytest.approx(0.2 * (1 + 15 / 16))  # before_step saw 0/16 .. 15/16
    assert result.loss < torch.log(torch.tensor(64.0)).item()  # learned something against log(batch)

    class Stop(Exception):
        pass

    def stop_in_epoch_2(line: str) -> None:
        if line.startswith("epoch 2:"):
            raise Stop

    with pytest.raises(Stop):
        pretrain(toy_config(tmp_path / "resumed"), baselines=False, echo=stop_in_epoch_2)
    ckpt = tmp_path / "resumed" / "checkpoint.pt"
    assert load_checkpoint(ckpt)["epoch"] == 1
    pretrain(toy_config(tmp_path / "resumed"), resume=ckpt, baselines=False, echo=lambda s: None)
    resumed = load_checkpoint(ckpt)
    assert resumed["step"] == full["step"]
    for name, value in full["model"].items():
        assert torch.equal(value, resumed["model"][name]), name


def test_the_command_line_imports_a_users_method(tmp_path, capsys, monkeypatch):
    """`--import MODULE` runs the module's @register before the config is checked."""
    (tmp_path / "my_methods.py").write_text(
        "import torch.nn.functional as F, torch\n"
        "from moco import Method, register\n\n"
        "@register('from_a_module')\n"
        "class FromAModule(Method):\n"
        "    @classmethod\n"
        "    def build(cls, cfg, encoder, num_images):\n"
        "        return cls(encoder)\n\n"
        "    def forward(self, x_q, x_k, index=None):\n"
        "        q, k = (F.normalize(self.encoder_q(x), dim=1) for x in (x_q, x_k))\n"
        "        return q @ k.T / 0.2, torch.arange(len(q))\n\n"
        "    def chance(self, batch_size):\n"
        "        return batch_size, 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    argv = ["pretrain", "--preset", "smoke", "--method", "from_a_module", "--width", "4", "--epochs", "1",
            "--train-subset", "256", "--out-dir", str(tmp_path / "run"), "--no-progress", "--no-baselines"]
    assert main(argv) == 2 and "method='from_a_module' is unknown" in capsys.readouterr().err
    assert main([*argv, "--import", "my_methods"]) == 0
    assert "method: from_a_module" in capsys.readouterr().out
    assert main([*argv, "--import", "no_such_module"]) == 2
    assert "--import no_such_module" in capsys.readouterr().err


def test_a_method_must_implement_the_interface():
    class Incomplete(Method):
        pass

    with pytest.raises(TypeError, match="abstract"):
        Incomplete(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="subclass of moco.model.Method"):
        register("not_a_method")(nn.Linear)


@pytest.mark.parametrize("method", ["moco", "end_to_end", "memory_bank"])
def test_compile_works_for_every_method(tmp_path, monkeypatch, method):
    """`--compile` compiles each method's encoders (MoCo's key encoder too); compilation itself is stubbed out here
    (a real compiled run: test_train.py)."""
    compiled: list[nn.Module] = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, *a, **k: compiled.append(self))
    cfg = apply_overrides(toy_config(tmp_path, epochs=1), {"method": method, "compile": True, "queue_size": 256})
    seen = {}
    pretrain(cfg, baselines=False, echo=lambda s: None, on_step=lambda step, m: seen.setdefault("method", m))
    method_object = seen["method"]
    expected = [method_object.encoder_q] + ([method_object.encoder_k] if method == "moco" else [])
    assert compiled == expected


def test_torchrun_refuses_the_one_process_methods():
    from moco.train.setup import check_pretrain_config

    for name in ("end_to_end", "memory_bank"):
        cfg = apply_overrides(preset("smoke"), {"method": name, "bn_splits": 2})
        check_pretrain_config(cfg, world=1)
        with pytest.raises(ConfigError, match=f"method={name} runs on one process"):
            check_pretrain_config(cfg, world=2)
    assert list(METHODS)[:3] == ["moco", "end_to_end", "memory_bank"]
