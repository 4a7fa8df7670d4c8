"""The command line under ``torchrun``: one node with two processes, and two "nodes" that
meet through a c10d rendezvous on 127.0.0.1 (the multi-node code path)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from kfac.__main__ import main

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
TASK = [
    "train", "--optimizer", "rkfac", "--model", "autoencoder", "--width", "0.25", "--epochs",
    "1", "--max-train", "256", "--batch-size", "64", "--quiet",
]  # fmt: skip


def _torchrun() -> list[str]:
    exe = shutil.which("torchrun")
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    path = tmp_path_factory.mktemp("cli") / "one.json"
    assert main([*TASK, "--json", str(path)]) == 0
    return json.loads(path.read_text())["results"][0]["train_loss"]


def test_torchrun_two_processes_print_once_and_match_one_process(
    tmp_path: Path, single: list[float], capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    path = tmp_path / "two.json"
    command = [*_torchrun(), "--nproc-per-node", "2", "--master-port", str(_free_port())]
    run = subprocess.run(
        [*command, "-m", "kfac", *TASK, "--json", str(path)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("| optimizer | train loss |") == 1  # rank 0 alone prints
    assert "2 processes" in run.stdout
    for rank in (0, 1):  # every rank's phase times
        assert f"| rkfac | {rank} | " in run.stdout
    losses = json.loads(path.read_text())["results"][0]["train_loss"]
    assert losses == pytest.approx(single, rel=1e-5)  # the same global batches


def test_two_nodes_meet_through_a_c10d_rendezvous(tmp_path: Path, single: list[float]) -> None:
    endpoint = f"127.0.0.1:{_free_port()}"
    nodes = []
    for node in (0, 1):
        command = [
            *_torchrun(), "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "kfac-test",
            "-m", "kfac", *TASK, "--json", str(tmp_path / f"node{node}.json"),
        ]  # fmt: skip
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
        nodes.append(subprocess.Popen(command, cwd=ROOT, env=_env(), text=True, **pipes))
    outputs = [process.communicate(timeout=240) for process in nodes]
    for process, (_, err) in zip(nodes, outputs, strict=True):
        assert process.returncode == 0, err[-3000:]
    printed = [out for out, _ in outputs if "| optimizer | train loss |" in out]
    assert len(printed) == 1  # global rank 0 alone prints
    assert "2 processes" in printed[0]
    written = [p for p in tmp_path.glob("node*.json")]
    assert len(written) == 1
    losses = json.loads(written[0].read_text())["results"][0]["train_loss"]
    assert losses == pytest.approx(single, rel=1e-5)


def test_torchrun_refuses_a_last_batch_smaller_than_the_processes() -> None:
    """Before: 65 samples in batches of 64 left rank 1 an empty last shard; its NaN loss
    stopped it alone and rank 0 failed in the all-reduce with a gloo connection error."""
    command = [*_torchrun(), "--nproc-per-node", "2", "--master-port", str(_free_port())]
    task = ["train", "--optimizer", "sgd", "--model", "mlp", "--width", "0.25", "--epochs",
            "1", "--max-train", "65", "--batch-size", "64", "--quiet"]  # fmt: skip
    run = subprocess.run(
        [*command, "-m", "kfac", *task],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert run.returncode != 0
    assert "usage:" in run.stderr
    assert "global batch of 1 samples cannot be split over 2 processes" in run.stderr
    assert "diverged" not in run.stderr


def test_torchrun_uneven_shards_match_one_process(tmp_path: Path) -> None:
    """Global batches of 5 split 3 + 2: each process's mean gradient enters weighted by its
    share of the batch. Before: the plain mean of the two (sample weights 1/6 and 1/4, not
    1/5) drifted from one process (final loss 1.4227 against 1.4151)."""
    task = ["train", "--optimizer", "sgd", "--model", "mlp", "--width", "0.25", "--epochs",
            "2", "--max-train", "50", "--batch-size", "5", "--evals-per-epoch", "2",
            "--quiet"]  # fmt: skip
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    assert main([*task, "--json", str(one)]) == 0
    command = [*_torchrun(), "--nproc-per-node", "2", "--master-port", str(_free_port())]
    run = subprocess.run(
        [*command, "-m", "kfac", *task, "--json", str(two)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    single = json.loads(one.read_text())["results"][0]["train_loss"]
    losses = json.loads(two.read_text())["results"][0]["train_loss"]
    assert len(losses) == len(single) == 5
    assert losses == pytest.approx(single, rel=1e-5)
