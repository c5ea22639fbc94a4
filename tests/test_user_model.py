"""The user's own model and data, devices and mixed precision."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from normlab.cli import main
from normlab.data import load_dataset
from normlab.nn import FullNorm1d
from normlab.train import TrainConfig, resolve_device, train

CFG = TrainConfig(widths=(16,), epochs=1, max_steps=12, eval_train=False)


class UserMLP(nn.Module):
    """A user's model: attribute BNs, no Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32, bias=False)
        self.bn1 = nn.BatchNorm1d(32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn1(self.fc1(x.flatten(1)))))


def _metrics(result) -> dict:
    return {k: v for k, v in result.final.items() if k != "time"}


def test_train_converts_the_users_model_and_learns():
    torch.manual_seed(0)
    model = UserMLP()
    result = train(TrainConfig(method="fn", epochs=2, eval_train=False), model=model)
    assert isinstance(model.bn1, FullNorm1d) and result.model is model
    assert isinstance(model.fc1, nn.Linear) and isinstance(model.fc2, nn.Linear)
    assert result.final["test_acc"] > 0.5


@pytest.mark.parametrize("wrap", [lambda d: d, lambda d: DataLoader(d, batch_size=7)])
@pytest.mark.parametrize("scenario", ["shuffled", "unshuffled", "scaled"])
def test_torch_datasets_stream_exactly_like_the_in_memory_dataset(wrap, scenario):
    data = load_dataset("digits", seed=0)
    pair = (
        wrap(TensorDataset(data.x_train, data.y_train)),
        wrap(TensorDataset(data.x_test, data.y_test)),
    )
    cfg = CFG.replace(scenario=scenario, eval_train=True)
    in_memory = train(cfg, data=data)
    streamed = train(cfg, data=pair)
    assert _metrics(streamed) == _metrics(in_memory)  # same batches, same numbers, bit for bit


def test_streamed_labels_are_read_from_samples_when_not_exposed():
    class Plain(torch.utils.data.Dataset):
        def __init__(self, x, y):
            self.x, self.y = x, y

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i], int(self.y[i])

    data = load_dataset("digits", seed=0)
    pair = (Plain(data.x_train, data.y_train), Plain(data.x_test, data.y_test))
    assert _metrics(train(CFG, data=pair)) == _metrics(train(CFG, data=data))


def test_bad_data_is_a_clear_error():
    with pytest.raises(TypeError, match=r"\(train, test\) pair"):
        train(CFG, data=torch.zeros(3))


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "mymod.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn
            from normlab.data import load_dataset

            def factory(input_shape, num_classes):
                n = 1
                for s in input_shape:
                    n *= s
                return nn.Sequential(nn.Flatten(), nn.Linear(n, 12, bias=False),
                                     nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, num_classes))

            def data(root=None, seed=0):
                d = load_dataset("digits", seed=seed)
                return (torch.utils.data.TensorDataset(d.x_train, d.y_train),
                        torch.utils.data.TensorDataset(d.x_test, d.y_test))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "mymod"
    sys.modules.pop("mymod", None)


def test_cli_compare_with_a_user_model_and_dataset(user_module, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "run",
        "compare",
        "--smoke",
        "--model",
        "mymod:factory",
        "--dataset",
        "mymod:data",
        "--methods",
        "gn,bnp",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    results = json.loads((out / "results.json").read_text())
    assert all(cell["ok"] for cell in results["cells"].values())
    assert main([*argv[:3], "--model", "mymod:nothing", "--out", str(tmp_path / "x")]) == 2
    assert "cannot import" in capsys.readouterr().err


def test_cli_device_and_precision(tmp_path, capsys):
    base = ["run", "compare", "--smoke", "--methods", "bn,gn", "--no-progress"]
    assert (
        main([*base, "--device", "cpu", "--precision", "bf16", "--out", str(tmp_path / "a")]) == 0
    )
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert all(cell["ok"] for name, cell in results["cells"].items() if "shuffled" in name)
    if not torch.cuda.is_available():
        capsys.readouterr()
        assert main([*base, "--device", "cuda", "--out", str(tmp_path / "b")]) == 2
        err = capsys.readouterr().err.strip()
        assert "CUDA is not available" in err and len(err.splitlines()) == 1
        assert not (tmp_path / "b").exists()


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("gpu0")


def test_fp16_trains_with_a_grad_scaler_and_bf16_close_to_fp32():
    fp32 = train(CFG)
    bf16 = train(CFG.replace(precision="bf16"))
    assert abs(bf16.final["test_acc"] - fp32.final["test_acc"]) < 0.1
    fp16 = train(CFG.replace(precision="fp16", method="bnp"))
    assert torch.isfinite(torch.tensor(fp16.final["test_loss"]))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["bn", "torch-bn", "fn", "bnp", "gn"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cuda_training_matches_cpu(method, precision):
    cfg = CFG.replace(method=method, precision=precision)
    cpu = train(cfg.replace(device="cpu"))
    gpu = train(cfg.replace(device="cuda"))
    tol = 0.02 if precision == "fp32" else 0.15
    assert abs(gpu.final["test_acc"] - cpu.final["test_acc"]) <= tol


def test_csv_logger_mirrors_the_metrics(tmp_path):
    train(CFG, tmp_path / "run", logger="csv")
    records = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert rows[0] == "kind,step,key,value"
    expected = {
        (r["kind"], str(r["step"]), k, str(v))
        for r in records
        for k, v in r.items()
        if isinstance(v, (int, float)) and k != "step"
    }
    assert {tuple(row.split(",")) for row in rows[1:]} == expected
    with pytest.raises(ValueError, match="unknown logger"):
        train(CFG, tmp_path / "other", logger="wandb")


def test_cli_progress_and_logger_flags(tmp_path, capsys):
    argv = ["run", "compare", "--smoke", "--methods", "gn", "--logger", "csv", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "a")]) == 0
    assert list((tmp_path / "a" / "runs").glob("*/metrics.csv"))


def test_figures_colour_each_method_alike_and_write_every_format(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from normlab.experiments import core

    fig, (a, b) = plt.subplots(1, 2)
    a.plot([0, 1], [0, 1], label="bn")
    a.plot([0, 1], [1, 0], label="fn")
    b.plot([0, 1], [0, 1], label="fn/online")
    b.plot([0, 1], [1, 1], label="bn/online")
    a.set_xlabel("step")
    core.set_figure_formats(["png", "svg"])
    try:
        out = core.savefig(fig, tmp_path / "f.png")
    finally:
        core.set_figure_formats(["png"])
    assert out == tmp_path / "f.png" and (tmp_path / "f.svg").is_file()
    colors = {line.get_label(): line.get_color() for ax in (a, b) for line in ax.get_lines()}
    assert colors["bn"] == colors["bn/online"] == core.method_color("bn")
    assert colors["fn"] == colors["fn/online"] != colors["bn"]
    assert all(float(t).is_integer() for t in a.get_xticks())
    with pytest.raises(ValueError, match="png, pdf and/or svg"):
        core.set_figure_formats(["gif"])
