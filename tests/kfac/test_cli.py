"""The command line, the dataset loaders (on files the tests write) and the models."""

from __future__ import annotations

import gzip
import json
import pickle
import re
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import kfac
from kfac import data, models
from kfac.__main__ import RunConfig, main, optimizer_names, train


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


@pytest.fixture
def mnist_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    write_idx(tmp_path / "train-images-idx3-ubyte", rng.integers(0, 256, (20, 28, 28)), True)
    write_idx(tmp_path / "train-labels-idx1-ubyte", rng.integers(0, 10, 20))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 256, (8, 28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(8) % 10, True)
    return tmp_path


def test_mnist_idx_loader(mnist_dir: Path) -> None:
    ds = data.load(mnist_dir)
    assert ds.name == "mnist"
    assert ds.x_train.shape == (20, 1, 28, 28)
    assert ds.x_test.shape == (8, 1, 28, 28)
    assert ds.y_test.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert ds.x_train.dtype == torch.float32
    assert float(ds.x_train.min()) >= 0.0
    assert float(ds.x_train.max()) <= 1.0
    raw = gzip.decompress((mnist_dir / "train-images-idx3-ubyte.gz").read_bytes())
    first = np.frombuffer(raw, dtype=np.uint8, offset=16)[: 28 * 28].reshape(28, 28)
    torch.testing.assert_close(ds.x_train[0, 0], torch.from_numpy(first / 255.0).float())


def test_idx_errors(tmp_path: Path) -> None:
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"\x01\x02\x08\x03")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.load_mnist_idx(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing train-images-idx3-ubyte"):
        data.load_mnist_idx(tmp_path / "nowhere")


def test_cifar10_loader(tmp_path: Path) -> None:
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
            b"labels": list(range(4)),
        }
        (root / name).write_bytes(pickle.dumps(batch))
    ds = data.load(tmp_path)
    assert ds.name == "cifar10"
    assert ds.x_train.shape == (20, 3, 32, 32)
    assert ds.num_classes == 4
    batch = pickle.loads((root / "test_batch").read_bytes())
    expected = torch.from_numpy(batch[b"data"][0].reshape(3, 32, 32) / 255.0).float()
    torch.testing.assert_close(ds.x_test[0], expected)


def test_npz_loader(tmp_path: Path) -> None:
    path = tmp_path / "tiny.npz"
    x = np.random.default_rng(0).random((6, 12, 12)).astype(np.float32)
    np.savez(path, x_train=x, y_train=np.arange(6) % 2, x_test=x[:2], y_test=np.array([0, 1]))
    ds = data.load(path)
    assert ds.image_shape == (1, 12, 12)
    torch.testing.assert_close(ds.x_train[:, 0], torch.from_numpy(x))
    np.savez(tmp_path / "bad.npz", x_train=x)
    with pytest.raises(ValueError, match="missing arrays"):
        data.load(tmp_path / "bad.npz")


def test_digits28_is_mnist_shaped_and_deterministic() -> None:
    a, b = data.digits28(), data.digits28()
    assert a.x_train.shape[1:] == (1, 28, 28)
    assert a.x_train.shape[0] + a.x_test.shape[0] == 1797
    assert torch.equal(a.y_test, b.y_test)
    assert a.num_classes == 10


def test_models_and_width() -> None:
    ae = models.autoencoder(784, width=1.0)
    sizes = [m.out_features for m in ae if isinstance(m, torch.nn.Linear)]
    assert sizes == [1000, 500, 250, 30, 250, 500, 1000, 784]
    wide = models.autoencoder(784, width=2.0)
    assert next(m.out_features for m in wide if isinstance(m, torch.nn.Linear)) == 2000
    out = models.build("cnn", (3, 32, 32), 10, 0.5)(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    with pytest.raises(ValueError, match="Invalid width"):
        models.mlp(width=0)
    with pytest.raises(ValueError, match="Invalid model: 'resnet'"):
        models.build("resnet", (1, 28, 28), 10, 1.0)


def test_optimizer_names_follow_the_registry() -> None:
    names = optimizer_names()
    assert names[:4] == ["sgd", "adam", "adamw", "kfac"]
    for alias in ("rkfac", "srekfac", "bkfac", "brkfac", "bckfac", "brckfac"):
        assert alias in names
    for inverse in kfac.inverse_names():
        assert f"kfac-{inverse}" in names


def test_train_runs_on_real_files_and_records_history(mnist_dir: Path) -> None:
    cfg = RunConfig(optimizer="kfac", model="cnn", epochs=2, batch_size=8, data=str(mnist_dir))
    result = train(cfg, progress=False)
    assert result.steps == 6
    assert result.step == [0, 3, 6]
    assert all(a is not None for a in result.test_accuracy)
    assert result.time == sorted(result.time)


def test_compare_writes_table_plot_and_json(tmp_path: Path, capsys) -> None:
    plot, out = tmp_path / "cmp.png", tmp_path / "cmp.json"
    code = main(
        [
            "compare",
            "--optimizers", "sgd", "adam", "kfac",
            "--model", "mlp",
            "--width", "0.25",
            "--epochs", "1",
            "--max-train", "256",
            "--target-accuracy", "0.0",
            "--lr", "sgd=0.05",
            "--plot", str(plot),
            "--json", str(out),
            "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    for name in ("| sgd |", "| adam |", "| kfac |", "time to target (s)"):
        assert name in text
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    payload = json.loads(out.read_text())
    assert [c["optimizer"] for c in payload["configs"]] == ["sgd", "adam", "kfac"]
    assert payload["configs"][0]["lr"] == 0.05
    assert all(r["time_to_target"] == 0.0 for r in payload["results"])  # target 0 is met at once


def test_cli_subprocess_train_with_progress_bar() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kfac", "train", "--model", "mlp", "--width", "0.25",
         "--epochs", "1", "--max-train", "128", "--optimizer", "kfac-eigh"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "| kfac-eigh |" in proc.stdout
    assert "kfac-eigh" in proc.stderr  # the tqdm bar


def test_inverse_options_reach_the_strategy(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    args = ["train", "--optimizer", "bkfac", "--model", "mlp", "--width", "0.25", "--epochs",
            "1", "--max-train", "128", "--quiet", "--json", str(out)]  # fmt: skip
    options = '{"identity_clock": "batches", "rank": 50}'
    assert main([*args, "--inverse-options", options]) == 0
    config = json.loads(out.read_text())["configs"][0]
    assert config["inverse_options"] == {"identity_clock": "batches", "rank": 50}
    with pytest.raises(SystemExit):
        main([*args, "--inverse-options", '{"identity_clock": "hours"}'])


@pytest.mark.parametrize("text", ["{rank: 5}", "[1, 2]"])
def test_inverse_options_must_be_a_json_object(text: str, capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--inverse-options", text])
    assert "--inverse-options" in capsys.readouterr().err


def test_mbf_from_the_command_line_with_block_options(tmp_path: Path) -> None:
    out = tmp_path / "run.json"
    args = ["train", "--optimizer", "mbf", "--model", "mlp", "--width", "0.25", "--epochs",
            "1", "--max-train", "128", "--quiet", "--json", str(out)]  # fmt: skip
    assert main([*args, "--inverse-options", '{"block_size": 4, "damping_mode": "relative"}']) == 0
    config = json.loads(out.read_text())["configs"][0]
    assert config["optimizer"] == "mbf"
    assert config["inverse_options"] == {"block_size": 4, "damping_mode": "relative"}
    with pytest.raises(SystemExit):
        main([*args, "--inverse-options", '{"block_size": 0}'])


@pytest.mark.parametrize(
    ("name", "options", "bad"),
    [
        ("fngd", {}, {"gram": "dense"}),
        ("fngd", {"coefficients": "shared"}, {"store": "epoch"}),  # the weighted-loss path
        (
            "fngd",
            {"coefficients": "shared", "weighted_step": "rows", "refresh_steps": 2},
            {"weighted_step": "backward"},
        ),
        ("seng", {"scaling": "reference", "col_sample_size": 8}, {"scaling": "none"}),
    ],
)
def test_fngd_and_seng_from_the_command_line(name, options, bad, tmp_path: Path, capsys) -> None:
    out = tmp_path / "run.json"
    args = ["train", "--optimizer", name, "--model", "cnn", "--width", "0.25", "--epochs",
            "2", "--max-train", "128", "--batch-size", "64", "--quiet", "--json", str(out),
            "--inverse-options", json.dumps(options)]  # fmt: skip
    assert main(args) == 0
    payload = json.loads(out.read_text())
    assert payload["configs"][0]["optimizer"] == name
    assert payload["configs"][0]["damping"] == 0.1
    assert payload["results"][0]["steps"] == 4
    key = next(iter(bad))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([*args[:-1], json.dumps(bad)])
    assert f"Invalid {key}: '{bad[key]}'" in capsys.readouterr().err


def test_train_accepts_an_optimizer_factory() -> None:
    cfg = RunConfig(optimizer="rmsprop", model="mlp", width=0.25, epochs=1, max_train=128)
    result = train(
        cfg, progress=False, make_optimizer=lambda m: torch.optim.RMSprop(m.parameters())
    )
    assert result.optimizer == "rmsprop"
    assert result.steps == 1


def test_run_config_label_names_the_result() -> None:
    cfg = RunConfig(optimizer="sgd", model="mlp", width=0.25, epochs=1, max_train=128,
                    label="sgd-small")  # fmt: skip
    assert train(cfg, progress=False).optimizer == "sgd-small"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--kl-clip", "-1"], "argument --kl-clip: must be finite and >= 0"),
        (["train", "--device", "cuda"], "--device cuda: CUDA is not available"),
        (
            ["compare", "--optimizers", "kfac", "rkfac", "--inverse-options", '{"rank": 5}'],
            r"--optimizer kfac: inverse='eigh' does not take option\(s\) \['rank'\]",
        ),
        (
            ["train", "--inverse-options", '{"identity_clock": "hours"}', "--optimizer", "bkfac"],
            "--optimizer bkfac: Invalid identity_clock: 'hours'",
        ),
    ],
    ids=["kl-clip", "device", "options-of-one-optimizer", "bad-option"],
)
def test_cli_errors_are_usage_errors_before_any_training(args, message, capsys) -> None:
    """Before: tracebacks (and a compare run trained the first optimizers first)."""
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--quiet", "--epochs", "1", "--max-train", "64"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err


def test_cli_kl_clip_zero_is_off_and_help_shows_defaults(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "(default: 0.0001)" in capsys.readouterr().out
    args = ["train", "--model", "mlp", "--width", "0.25", "--epochs", "1", "--max-train", "64"]
    assert main([*args, "--kl-clip", "0", "--quiet"]) == 0


def test_mnist_cnn_is_the_kld_wrm_papers_network() -> None:
    model = models.build("mnist-cnn", (1, 28, 28), 10, 1.0)
    assert sum(p.numel() for p in model.parameters()) == 4712  # as the paper's logs report
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(112, 30), (30, 10)]
    assert any(isinstance(m, torch.nn.Dropout) for m in model)
    assert models.build("mnist-cnn", (3, 32, 32), 10, 1.0)(torch.randn(2, 3, 32, 32)).shape == (
        2,
        10,
    )
    with pytest.raises(ValueError, match=r"Invalid image_shape: \(1, 12, 12\)"):
        models.mnist_cnn((1, 12, 12))


@pytest.mark.parametrize("name", ["so-kld-wrm", "q-kld-wrm", "qe-kld-wrm"])
def test_kld_wrm_from_the_command_line(name: str, tmp_path: Path, mnist_dir: Path) -> None:
    """The paper's defaults reach the optimizer (rho per method, eigenbasis damping 0.01,
    periods 30); the QE options pass through ``--inverse-options``; real MNIST files load."""
    out = tmp_path / "run.json"
    args = ["train", "--optimizer", name, "--model", "mnist-cnn", "--epochs", "2",
            "--batch-size", "8", "--data", str(mnist_dir), "--quiet",
            "--json", str(out)]  # fmt: skip
    if name == "qe-kld-wrm":
        args += ["--inverse-options", '{"inner_steps": 2, "snapshots": 2}']
    assert main(args) == 0
    config = json.loads(out.read_text())["configs"][0]
    rho = {"so-kld-wrm": 0.33, "q-kld-wrm": 0.5, "qe-kld-wrm": 0.5}[name]
    assert config["factor_decay"] == rho
    assert config["damping"] == 0.01
    assert config["damping_scheme"] == "eigenbasis"
    assert (config["factor_every"], config["inverse_every"]) == (30, 30)
    assert config["rms_clip"] == (None if name == "so-kld-wrm" else 2.0)
    assert name in optimizer_names()
    assert main([*args, "--factor-decay", "0.2", "--damping-scheme", "factored"]) == 0
    config = json.loads(out.read_text())["configs"][0]
    assert (config["factor_decay"], config["damping_scheme"]) == (0.2, "factored")


def test_pytorch_optimizer_peers_from_the_command_line(tmp_path: Path) -> None:
    """Muon, SOAP, PSGD Kron and Shampoo (pytorch-optimizer) train from ``compare`` (16
    steps: Shampoo leaves the weights where they are until its first matrix roots, at step
    10)."""
    pytest.importorskip("pytorch_optimizer")
    out = tmp_path / "peers.json"
    code = main(
        ["compare", "--optimizers", "muon", "soap", "psgd-kron", "shampoo", "--model", "mlp",
         "--width", "0.25", "--epochs", "1", "--max-train", "256", "--batch-size", "16",
         "--quiet", "--lr", "muon=0.01", "--json", str(out)]
    )  # fmt: skip
    assert code == 0
    payload = json.loads(out.read_text())
    assert [r["optimizer"] for r in payload["results"]] == ["muon", "soap", "psgd-kron", "shampoo"]
    for r in payload["results"]:
        assert r["steps"] == 16
        assert all(np.isfinite(r["train_loss"]))
        assert r["train_loss"][-1] != r["train_loss"][0]  # the weights moved


def test_muon_takes_the_layer_matrices_and_adamw_the_rest() -> None:
    pytest.importorskip("pytorch_optimizer")
    from kfac.__main__ import MUON_ADAMW_LR, _make_optimizer

    model = models.build("transformer", (1, 28, 28), 10, 0.25)
    opt = _make_optimizer("muon", model, RunConfig(optimizer="muon", lr=0.05), "cross_entropy")
    muon, rest = opt.param_groups
    assert muon["use_muon"] is True
    assert rest["use_muon"] is False
    assert (muon["lr"], rest["lr"]) == (0.05, MUON_ADAMW_LR)
    matrices = {
        id(m.weight) for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
    }
    assert {id(p) for p in muon["params"]} == matrices
    assert id(model.position) in {id(p) for p in rest["params"]}  # a 2-D table, not a layer
    assert len(muon["params"]) + len(rest["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("name", ["muon", "soap", "psgd-kron", "shampoo"])
def test_missing_pytorch_optimizer_is_a_usage_error(name: str, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "pytorch_optimizer", None)  # import raises ImportError
    with pytest.raises(SystemExit) as exit_info:
        main(["compare", "--optimizers", "adam", name, "--quiet", "--epochs", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(
        rf"--optimizer {name}: optimizer '{name}' is pytorch-optimizer's \w+, which is not "
        r"installed: pip install pytorch-optimizer",
        err,
    ), err


def test_max_time_stops_a_run_early() -> None:
    def ticks() -> Callable[[], float]:
        now = iter(range(1000))
        return lambda: float(next(now))  # every call one second later: each step takes 1 s

    cfg = RunConfig(optimizer="sgd", model="mlp", width=0.25, epochs=3, batch_size=32,
                    max_train=128, max_time=5.0)  # fmt: skip
    result = train(cfg, progress=False, timer=ticks())
    assert result.steps == 5
    assert result.wall_time == 5.0
    assert result.step[-1] == 5  # the last step is evaluated
    assert train(RunConfig(**{**cfg.__dict__, "max_time": None}), progress=False).steps == 12


@pytest.mark.parametrize("model", ["autoencoder", "mlp"])
def test_quadratic_step_and_adaptive_damping_from_the_command_line(
    model: str, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run.json"
    args = ["train", "--optimizer", "bkfac", "--model", model, "--width", "0.25", "--epochs",
            "2", "--max-train", "128", "--batch-size", "32", "--quiet", "--json", str(out),
            "--inverse-options", '{"rank": 8}', "--quadratic-step",
            "--adaptive-damping"]  # fmt: skip
    assert main(args) == 0
    payload = json.loads(out.read_text())
    config, result = payload["configs"][0], payload["results"][0]
    assert config["quadratic_step"] is True
    assert config["adaptive_damping"] is True
    assert (config["damping"], config["damping_scheme"]) == (1e-4, "factored")
    assert result["steps"] == 8
    assert result["train_loss"][-1] < result["train_loss"][0]
    assert main([*args, "--damping-scheme", "eigenbasis", "--damping", "0.01"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main([*args, "--damping-scheme", "factored-relative"])
    assert "needs an absolute damping" in capsys.readouterr().err


_TINY = ["--quiet", "--model", "mlp", "--width", "0.25", "--epochs", "1", "--max-train", "64"]


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the command line on ``argv``; it must exit 2 with a usage line. Its stderr."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err
    return err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs", "0"], "argument --epochs: must be an integer >= 1, got '0'"),
        (["--batch-size", "0"], "argument --batch-size: must be an integer >= 1, got '0'"),
        (["--batch-size", "-5"], "argument --batch-size: must be an integer >= 1, got '-5'"),
        (["--batch-size", "2.5"], "argument --batch-size: expected an integer, got '2.5'"),
        (["--evals-per-epoch", "0"], "argument --evals-per-epoch: must be an integer >= 1"),
        (["--max-train", "0"], "argument --max-train: must be an integer >= 1, got '0'"),
        (["--max-train", "-10"], "argument --max-train: must be an integer >= 1, got '-10'"),
        (["--seed", "-1"], "argument --seed: must be an integer >= 0, got '-1'"),
        (["--width", "nan"], "argument --width: must be finite, got 'nan'"),
        (["--width", "-1"], "argument --width: must be > 0, got '-1'"),
        (["--lr", "nan"], "argument --lr: must be finite, got 'nan'"),
        (["--lr", "0"], "argument --lr: must be > 0, got '0'"),
        (["--max-time", "-1"], "argument --max-time: must be > 0, got '-1'"),
        (["--max-time", "inf"], "argument --max-time: must be finite, got 'inf'"),
        (["--target-loss", "nan"], "argument --target-loss: must be finite, got 'nan'"),
        (["--target-accuracy", "2"], "argument --target-accuracy: must be <= 1, got '2'"),
        (["--target-accuracy", "x"], "argument --target-accuracy: expected a number, got 'x'"),
    ],
)
def test_cli_rejects_bad_numbers_with_a_usage_error(args, message, capsys) -> None:
    """Before: ``--batch-size 0`` raised ZeroDivisionError, ``--max-train 0`` a RuntimeError
    from ``max()`` of an empty tensor; ``--batch-size -5``, ``--epochs 0``, ``--max-train -10``
    (all but the last 10 samples), ``--max-time -1``, ``--lr nan`` (SGD) ran and exited 0."""
    err = _usage_error(["train", *_TINY, *args], capsys)
    assert message in err, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--optimizers", "sgd", "--lr", "sgd=abc"], "--lr sgd=abc: expected a number"),
        (["--optimizers", "sgd", "--lr", "sgd=nan"], "--lr sgd=nan: must be finite"),
        (["--optimizers", "sgd", "--lr", "adam=0.1"], "--lr expects NAME=LR with NAME in"),
        (["--optimizers", "sgd", "--lr", "sgd=0.1", "sgd=0.2"], "--lr sgd: given more than once"),
        (["--optimizers", "sgd", "adam", "sgd"], r"--optimizers: ['sgd'] given more than once"),
    ],
)
def test_compare_rejects_bad_learning_rates_and_repeats(args, message, capsys) -> None:
    """Before: ``sgd=abc`` raised ValueError with a traceback, ``adam=0.1`` exited with status
    1 and no usage line, ``sgd=nan`` trained, a repeated learning rate silently replaced the
    first, and a repeated optimizer trained twice."""
    err = _usage_error(["compare", *_TINY, *args], capsys)
    assert message in err, err


def test_cli_checks_paths_and_device_before_training(tmp_path: Path, capsys, monkeypatch) -> None:
    """Before: a bad ``--data`` or ``--device`` was a traceback, and an unwritable ``--plot``
    or ``--json`` (or a ``--plot`` format matplotlib cannot write) a traceback after the
    whole training run, with no JSON written; ``--target-accuracy`` on the autoencoder was
    silently never reached."""

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr("kfac.__main__.train", no_training)
    cases = [
        (["--data", str(tmp_path / "nowhere")], "nowhere: expected an .npz file"),
        (["--data", str(tmp_path)], "missing train-images-idx3-ubyte"),
        (["--plot", str(tmp_path / "no" / "x.png")], "x.png: directory"),
        (["--json", str(tmp_path / "no" / "x.json")], "x.json: directory"),
        (["--json", str(tmp_path)], f"--json {tmp_path}: is a directory"),
        (["--plot", str(tmp_path / "x.txt")], "x.txt: matplotlib cannot write .txt files"),
        (["--device", "bogus"], "--device 'bogus':"),
        (
            ["--model", "autoencoder", "--target-accuracy", "0.9"],
            "--target-accuracy: --model autoencoder is not a classifier",
        ),
        (["--device", ""], "--device '':"),
        (["--device", "meta"], "--device meta: the meta device holds no data"),
        (["--device", "xla"], "--device xla: not available here"),
    ]
    for args, message in cases:
        err = _usage_error(["train", *_TINY, *args], capsys)
        assert message in err, err


def _idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    return header + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()


@pytest.mark.parametrize(
    ("payload", "name", "message"),
    [
        (b"\x00\x00\x08\x03\x00\x00", "", "truncated IDX header"),
        (b"\x00\x00\x08\x00", "", r"truncated IDX header \(0 dimensions\)"),
        (b"", "", "not an IDX file"),
        (b"\x1f\x8b garbage", ".gz", "corrupt or truncated gzip data"),
        ("truncated-gzip", ".gz", "corrupt or truncated gzip data"),
        (
            b"\x00\x00\x08\x03" + struct.pack(">3I", 2**31, 2**31, 2**31),
            "",
            "expected 9903520314283042199192993792 values, found 0",
        ),
    ],
    ids=["short-header", "no-dims", "empty", "bad-gzip", "truncated-gzip", "huge-dims"],
)
def test_corrupt_idx_files_are_value_errors_naming_the_file(
    mnist_dir: Path, payload, name: str, message: str
) -> None:
    """Before: a short header raised numpy's 'buffer is smaller than requested size', corrupt
    or truncated gzip data BadGzipFile / EOFError without the file, and dimensions whose
    product overflows int64 a reshape error."""
    (mnist_dir / "train-images-idx3-ubyte.gz").unlink()
    if payload == "truncated-gzip":
        payload = gzip.compress(_idx_bytes(np.zeros((20, 28, 28))))[:-30]
    path = mnist_dir / f"train-images-idx3-ubyte{name}"
    path.write_bytes(payload)
    with pytest.raises(ValueError, match=f"train-images-idx3-ubyte{name}: {message}"):
        data.load(mnist_dir)


def test_idx_compression_is_told_by_content(mnist_dir: Path) -> None:
    """Before: a plain IDX file named ``.gz`` raised BadGzipFile and a gzipped one without
    the suffix 'bad magic number'."""
    expected = data.load(mnist_dir)
    plain = gzip.decompress((mnist_dir / "train-images-idx3-ubyte.gz").read_bytes())
    (mnist_dir / "train-images-idx3-ubyte.gz").write_bytes(plain)
    labels = mnist_dir / "train-labels-idx1-ubyte"
    labels.write_bytes(gzip.compress(labels.read_bytes()))
    ds = data.load(mnist_dir)
    assert torch.equal(ds.x_train, expected.x_train)
    assert torch.equal(ds.y_train, expected.y_train)


def test_a_directory_in_place_of_an_idx_file_is_missing(mnist_dir: Path) -> None:
    """Before: IsADirectoryError."""
    (mnist_dir / "t10k-labels-idx1-ubyte.gz").unlink()
    (mnist_dir / "t10k-labels-idx1-ubyte").mkdir()
    with pytest.raises(FileNotFoundError, match="missing t10k-labels-idx1-ubyte"):
        data.load(mnist_dir)


_X = np.random.default_rng(0).random((6, 12, 12)).astype(np.float32)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x_train": _X[:0], "y_train": np.zeros(0, int)}, "no training images"),
        ({"x_test": _X[:0], "y_test": np.zeros(0, int)}, "no test images"),
        ({"x_test": _X[:2, :8, :8]}, r"training images of shape \(1, 12, 12\) but test images"),
        ({"x_train": _X * np.nan}, "images contain NaN or infinite values"),
        ({"x_train": _X.astype(complex)}, "images must be booleans, integers or floats"),
        ({"x_train": (_X * 1000).astype(np.int16)}, r"integer images must be in \[0, 255\]"),
        ({"y_train": np.arange(6) / 2}, "labels must be integers, got non-integer values"),
        ({"y_train": np.arange(6) - 3}, "labels must be >= 0, got -3"),
        ({"y_train": np.eye(6)[:, :2]}, r"labels must be one class index per image, got shape"),
        ({"y_train": np.array(list("abcdef"))}, "labels must be integers, got dtype <U1"),
    ],
    ids=["no-train", "no-test", "shapes", "nan", "complex", "int16", "fractional",
         "negative", "one-hot", "strings"],
)  # fmt: skip
def test_npz_content_errors(tmp_path: Path, arrays: dict, message: str) -> None:
    """Before: empty splits raised RuntimeError from ``max()``, mismatched train/test shapes,
    NaN images, int16 images up to 999 (scaled to 3.9) and fractional or negative labels
    loaded (labels truncated to int, -3 a class index that crashes the loss), and one-hot
    labels reported '12 labels for 6 images'."""
    full = {"x_train": _X, "y_train": np.arange(6) % 2, "x_test": _X[:2], "y_test": np.arange(2)}
    np.savez(tmp_path / "d.npz", **{**full, **arrays})
    with pytest.raises(ValueError, match=message):
        data.load(tmp_path / "d.npz")


def test_npz_file_errors(tmp_path: Path) -> None:
    """Before: EOFError for an empty file, numpy's allow_pickle advice for a non-npz file
    and for object arrays (neither naming the file), and an ``.NPZ`` file was 'expected an
    .npz file'."""
    path = tmp_path / "d.npz"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"d.npz: not a readable .npz file"):
        data.load(path)
    path.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"d.npz: not a readable .npz file"):
        data.load(path)
    np.save(tmp_path / "a.npy", _X)
    (tmp_path / "a.npy").rename(path)
    with pytest.raises(ValueError, match=r"d.npz: a single .npy array, not an .npz archive"):
        data.load(path)
    objects = np.empty(2, dtype=object)
    np.savez(path, x_train=objects, y_train=np.arange(2), x_test=_X[:2], y_test=np.arange(2))
    with pytest.raises(ValueError, match=r"d.npz: unreadable array \(Object arrays"):
        data.load(path)
    upper = tmp_path / "d2.NPZ"
    np.savez(tmp_path / "d2.npz", x_train=_X, y_train=np.arange(6), x_test=_X, y_test=np.arange(6))
    (tmp_path / "d2.npz").rename(upper)
    assert data.load(upper).x_train.shape == (6, 1, 12, 12)


def _cifar_dir(root: Path, **override: bytes) -> Path:
    root.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batch = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [0, 1, 2, 3]}
        (root / name).write_bytes(override.get(name, pickle.dumps(batch)))
    return root


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"junk", "data_batch_2: not a CIFAR-10 batch .* UnpicklingError"),
        (pickle.dumps({b"x": 1}), r"data_batch_2: not a CIFAR-10 batch .* KeyError: b'data'"),
        (
            pickle.dumps({b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}),
            r"data_batch_2: data must have shape \(N, 3072\), got \(4, 100\)",
        ),
    ],
    ids=["not-a-pickle", "missing-key", "wrong-row-length"],
)
def test_corrupt_cifar_batches_are_value_errors_naming_the_file(
    tmp_path: Path, payload: bytes, message: str
) -> None:
    """Before: UnpicklingError, KeyError and numpy's reshape error, none naming the file."""
    root = _cifar_dir(tmp_path / "cifar", data_batch_2=payload)
    with pytest.raises(ValueError, match=message):
        data.load(root)


def test_corrupt_data_is_a_usage_error_on_the_command_line(mnist_dir: Path, capsys) -> None:
    (mnist_dir / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.arange(19) % 10))
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *_TINY, "--data", str(mnist_dir)])
    assert exit_info.value.code == 2
    assert "19 labels for 20 images" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("world", "max_train", "batch_size", "smallest"),
    [(2, 65, 64, 1), (2, 64, 1, 1), (3, 66, 64, 2)],
)
def test_a_global_batch_smaller_than_the_processes_is_refused(
    monkeypatch, world: int, max_train: int, batch_size: int, smallest: int
) -> None:
    """Before: under torchrun with 2 processes, 65 samples in batches of 64 left rank 1 an
    empty last shard, whose NaN loss stopped that rank alone ('the training loss diverged')
    while rank 0 waited in the all-reduce until gloo closed the connection."""
    monkeypatch.setattr("kfac.__main__._world", lambda: world)
    cfg = RunConfig(optimizer="sgd", model="mlp", width=0.25, epochs=1,
                    batch_size=batch_size, max_train=max_train)  # fmt: skip
    message = f"global batch of {smallest} samples cannot be split over {world} processes"
    with pytest.raises(ValueError, match=message):
        train(cfg, progress=False)


@pytest.mark.parametrize(
    ("field", "value", "low"),
    [("batch_size", 0, 1), ("batch_size", -5, 1), ("batch_size", 2.0, 1), ("epochs", -1, 0),
     ("evals_per_epoch", 0, 1), ("max_train", 0, 1), ("max_train", -10, 1)],
)  # fmt: skip
def test_train_rejects_bad_sizes(field: str, value, low: int) -> None:
    """Before: ``batch_size=0`` raised ZeroDivisionError, ``max_train=0`` a RuntimeError from
    ``max()``, ``max_train=-10`` dropped the last 10 samples and ``batch_size=-5`` trained
    for zero steps."""
    cfg = RunConfig(optimizer="sgd", model="mlp", width=0.25, epochs=1, max_train=64)
    setattr(cfg, field, value)
    with pytest.raises(
        ValueError, match=rf"Invalid {field}: {value!r} \(must be an integer >= {low}\)"
    ):
        train(cfg, progress=False)


@pytest.mark.parametrize(
    "args",
    [["--damping", "0.1"], ["--inverse-options", '{"rank": 5}'], ["--quadratic-step"],
     ["--factor-every", "5"], ["--rms-clip", "1"]],
)  # fmt: skip
def test_train_refuses_preconditioner_options_for_sgd_and_adam(args, capsys) -> None:
    """Before: ``train --optimizer sgd --quadratic-step`` (or ``--damping``, or
    ``--inverse-options``) trained plain SGD, the option silently ignored."""
    for name in ("sgd", "adam"):
        with pytest.raises(SystemExit) as exit_info:
            main(["train", *_TINY, "--optimizer", name, *args])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert f"--optimizer {name} takes no preconditioner options, got ['{args[0]}']" in err


def test_the_json_is_written_before_the_plot(tmp_path: Path, monkeypatch) -> None:
    """Before: a plot that failed after training (a full disk, a matplotlib error) lost the
    histories too, the JSON being written after it."""

    def failing_plot(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("kfac.__main__.plot", failing_plot)
    out = tmp_path / "h.json"
    with pytest.raises(OSError, match="disk full"):
        main(["train", *_TINY, "--optimizer", "sgd", "--plot", str(tmp_path / "p.png"),
              "--json", str(out)])  # fmt: skip
    assert json.loads(out.read_text())["results"][0]["steps"] == 1
