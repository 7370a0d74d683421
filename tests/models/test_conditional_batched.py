"""The batched multi-seed trainer against separate sequential runs, seed by seed.

Tolerance: the batched trainer computes each layer of every seed in one ``baddbmm`` where the
sequential one calls ``addmm``; only the summation order inside those products differs, so
parameters and logged numbers are compared at ``rtol=1e-5, atol=1e-6`` (float32). Everything
random (initialisation, minibatch order, pre-gate noise, gate uniforms, sampled evaluation
passes) must be drawn identically, or the numbers would differ in the first digit.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import pandas as pd
import pytest
import torch

from stochgrad.analysis import reproduce
from stochgrad.models import conditional as cc
from stochgrad.models.conditional_batched import SeedRun, batchable, capture_rng, train_seeds
from stochgrad.models.data import Digits, Split, load_mnist

RTOL, ATOL = 1e-5, 1e-6
NET = cc.ConditionalConfig(inputs=64, gater_hidden=16, gates=40)


@pytest.fixture(autouse=True)
def _away_from_mnist(tmp_path, monkeypatch):
    """Run where no ../shared/data/mnist.npz is found: the loaders fall back to the 8x8 digits
    that NET is sized for, whether or not MNIST lies beside the checkout."""
    monkeypatch.chdir(tmp_path)


def _digits(n_train: int = 160, n_valid: int = 60, n_test: int = 50) -> Digits:
    """A small subset of scikit-learn's 8x8 digits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        d = load_mnist(None)
    return dataclasses.replace(
        d,
        train=Split(d.train.x[:n_train], d.train.y[:n_train]),
        valid=Split(d.valid.x[:n_valid], d.valid.y[:n_valid]),
        test=Split(d.test.x[:n_test], d.test.y[:n_test]),
    )


def _gate(row: str, config: cc.TrainConfig) -> cc.GateType:
    return cc.original_gate(row) if config.original else cc.gate_type(row)


def _sequential(row, seed, config, data, checkpoint=None, on_epoch=None) -> cc.TrainResult:
    """A separate run, started as ``stochgrad reproduce paper`` starts it."""
    r = SeedRun.build(_gate(row, config), seed, config, NET)
    torch.set_rng_state(r.rng["cpu"])  # type: ignore[arg-type]
    return cc.train(r.net, data, r.config, on_epoch, checkpoint=checkpoint)


def _batched(row, seeds, config, data, checkpoints=None, on_epoch=None) -> list[cc.TrainResult]:
    runs = [
        SeedRun.build(
            _gate(row, config),
            s,
            config,
            NET,
            checkpoint=None if checkpoints is None else checkpoints[i],
            on_epoch=None if on_epoch is None else on_epoch[i],
        )
        for i, s in enumerate(seeds)
    ]
    return train_seeds(runs, data)


def _close_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=RTOL, atol=ATOL, msg=k)


def _close_history(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:
            if k == "seconds":
                continue
            if isinstance(ra[k], float) and math.isnan(ra[k]):
                assert math.isnan(rb[k]), k
            else:
                assert rb[k] == pytest.approx(ra[k], rel=RTOL, abs=ATOL), (k, ra[k], rb[k])


@pytest.mark.parametrize("seeds", [[0], [0, 1, 2]])
@pytest.mark.parametrize(
    "row,protocol",
    [
        ("straight_through", "spec"),
        ("straight_through", "original"),
        ("noisy_rectifier", "original"),
        ("sts", "original"),  # momentum 0.5, Beta noise, a fixed KL weight
        ("baseline_rectifier", "spec"),  # no uniforms drawn at the gate site
        ("baseline_sigmoid_noise", "spec"),  # no penalty, Gaussian noise
    ],
)
def test_parameters_after_k_steps_equal_separate_runs(row, protocol, seeds, tmp_path):
    """One epoch of k = 160 // 32 = 5 steps: the last weights (in the checkpoints), the
    momentum buffers, λ and the random states equal those of the separate runs."""
    data = _digits()
    config = cc.for_protocol(protocol, epochs=1, batch_size=32, progress=False)
    for s in seeds:
        _sequential(row, s, config, data, checkpoint=tmp_path / f"seq{s}.ckpt")
    _batched(row, seeds, config, data, checkpoints=[tmp_path / f"bat{s}.ckpt" for s in seeds])
    nets = []
    for s in seeds:
        a = torch.load(tmp_path / f"seq{s}.ckpt", weights_only=False)
        b = torch.load(tmp_path / f"bat{s}.ckpt", weights_only=False)
        assert a.keys() == b.keys()
        _close_state(a["net"], b["net"])
        assert a["opt"]["param_groups"] == b["opt"]["param_groups"]
        assert a["opt"]["state"].keys() == b["opt"]["state"].keys()
        for i, st in a["opt"]["state"].items():
            torch.testing.assert_close(
                b["opt"]["state"][i]["momentum_buffer"],
                st["momentum_buffer"],
                rtol=RTOL,
                atol=ATOL,
            )
        assert torch.equal(a["rng"], b["rng"]) and torch.equal(a["order"], b["order"])
        assert a["controller"] == b["controller"] and a["epoch"] == b["epoch"] == 1
        _close_history(a["history"], b["history"])
        nets.append(a["net"])
    if len(nets) > 1:  # the seeds themselves differ: the comparison above is not vacuous
        assert not torch.allclose(nets[0]["experts.weight"], nets[1]["experts.weight"])


@pytest.mark.parametrize("row", ["straight_through", "noisy_rectifier"])
def test_two_epoch_records_equal_separate_runs(row):
    """Log rows (sampled costs included), selection and final numbers per seed."""
    data = _digits()
    config = cc.for_protocol("original", epochs=2, batch_size=32, progress=False)
    seeds = [0, 1, 2]
    rows_b: list[list] = [[] for _ in seeds]
    batched = _batched(row, seeds, config, data, on_epoch=[r.append for r in rows_b])
    for s, b, logged in zip(seeds, batched, rows_b):
        rows_a: list = []
        a = _sequential(row, s, config, data, on_epoch=rows_a.append)
        _close_history(a.history, b.history)
        assert logged == b.history
        assert (b.best_epoch, b.stop_epoch) == (a.best_epoch, a.stop_epoch)
        for f in ("train_criterion", "valid_error", "test_error", "test_density", "threshold"):
            assert getattr(b, f) == pytest.approx(getattr(a, f), rel=RTOL, abs=ATOL), f
        assert b.test_error_stochastic == a.test_error_stochastic
        assert b.test_error_top_k == a.test_error_top_k
        _close_state(a.state_dict, b.state_dict)


def test_seeds_stop_early_on_their_own_and_the_others_go_on():
    """With patience 1 the seeds stop at different epochs; each as its separate run."""
    data = _digits(n_train=96)
    config = cc.for_protocol("original", epochs=8, batch_size=32, progress=False, patience=1)
    seeds = [0, 1, 2, 3]
    batched = _batched("straight_through", seeds, config, data)
    stops = []
    for s, b in zip(seeds, batched):
        a = _sequential("straight_through", s, config, data)
        _close_history(a.history, b.history)
        assert b.stop_epoch == a.stop_epoch
        _close_state(a.state_dict, b.state_dict)
        stops.append(b.stop_epoch)
    assert len(set(stops)) > 1, stops  # some seed went on after another one had stopped


@pytest.mark.parametrize("first", ["sequential", "batched"])
def test_resumes_the_other_trainers_checkpoint(first, tmp_path):
    """Two epochs by one trainer, two more by the other from its checkpoints == four epochs
    sequentially; seed 2 has no checkpoint, trains its first two epochs alone and then joins."""
    data = _digits(n_train=96)
    short = cc.for_protocol("original", epochs=2, batch_size=32, progress=False)
    config = dataclasses.replace(short, epochs=4)
    row, seeds = "sts", [0, 1, 2]  # STS: momentum buffers travel in the checkpoint
    ckpts = [tmp_path / f"seed{s}.ckpt" for s in seeds]
    if first == "sequential":
        for s in seeds[:2]:
            _sequential(row, s, short, data, checkpoint=ckpts[s])
        logged: list[list] = [[] for _ in seeds]
        resumed = _batched(row, seeds, config, data, ckpts, [r.append for r in logged])
        assert [[r["epoch"] for r in rows] for rows in logged] == [[3, 4], [3, 4], [1, 2, 3, 4]]
    else:
        _batched(row, seeds[:2], short, data, ckpts[:2])
        resumed = [_sequential(row, s, config, data, checkpoint=ckpts[s]) for s in seeds]
    for s, b in zip(seeds, resumed):
        a = _sequential(row, s, config, data)
        _close_history(a.history, b.history)
        _close_state(a.state_dict, b.state_dict)
        assert b.test_error == a.test_error


def test_reproduce_batch_seeds_writes_the_sequential_files(tmp_path, monkeypatch):
    """``run_rows(batch_seeds=True)`` against the sequential command: records and CSVs."""
    monkeypatch.chdir(tmp_path)
    data = reproduce.load_data(None, train_subset=64)
    config = cc.for_protocol("original", epochs=2, batch_size=32, progress=False)
    rows, seeds = ["baseline_sigmoid", "sbn"], [0, 1]  # sbn: stateful, stays sequential
    seq_results, seq_epochs = reproduce.run_rows(data, rows, seeds, config, tmp_path / "seq")
    bat_results, bat_epochs = reproduce.run_rows(
        data, rows, seeds, config, tmp_path / "bat", batch_seeds=True
    )
    drop = ["seconds"]
    pd.testing.assert_frame_equal(
        bat_epochs.drop(columns=drop), seq_epochs.drop(columns=drop), rtol=RTOL, atol=ATOL
    )
    pd.testing.assert_frame_equal(
        bat_results.drop(columns=drop), seq_results.drop(columns=drop), rtol=RTOL, atol=ATOL
    )
    for row in rows:
        for s in seeds:
            a = pd.read_csv(tmp_path / "seq" / "runs" / row / f"seed{s}.csv")
            b = pd.read_csv(tmp_path / "bat" / "runs" / row / f"seed{s}.csv")
            pd.testing.assert_frame_equal(
                b.drop(columns=drop), a.drop(columns=drop), rtol=RTOL, atol=ATOL
            )
            assert (tmp_path / "bat" / "runs" / row / f"seed{s}.ckpt").is_file()


def test_cli_batch_seeds(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = [
        "paper", "--epochs", "1", "--seeds", "2", "--rows", "baseline_sigmoid",
        "--out", str(tmp_path / "out"), "--train-subset", "64", "--no-bench", "--no-progress",
        "--batch-seeds",
    ]  # fmt: skip
    assert reproduce.main(args) == 0
    err = capsys.readouterr().err
    assert "baseline_sigmoid seeds [0, 1] trained together" in err
    assert "--batch-seeds" in (tmp_path / "out" / "report.md").read_text()
    assert len(pd.read_csv(tmp_path / "out" / "results.csv")) == 2


def test_errors():
    data = _digits(n_train=64)
    config = cc.TrainConfig(epochs=1, progress=False)
    assert not batchable(cc.gate_type("sbn")) and batchable(cc.gate_type("sts"))
    with pytest.raises(ValueError, match="stateful or not supported"):
        train_seeds([SeedRun.build("sbn", 0, config, NET)], data)
    with pytest.raises(ValueError, match="same settings except the seed"):
        train_seeds(
            [
                SeedRun.build("sts", 0, config, NET),
                SeedRun.build("sts", 1, dataclasses.replace(config, lr=0.5), NET),
            ],
            data,
        )
    with pytest.raises(ValueError, match="same gate type"):
        train_seeds(
            [
                SeedRun.build("sts", 0, config, NET),
                SeedRun.build("straight_through", 1, config, NET),
            ],
            data,
        )
    with pytest.raises(ValueError, match="at least one"):
        train_seeds([], data)
    with pytest.raises(ValueError, match="--executor local"):
        reproduce.run_rows(
            data, ["sts"], [0], config, "unused", executor=_Remote(), batch_seeds=True
        )


class _Remote:
    in_process = False


def test_global_random_state_is_left_alone():
    data = _digits(n_train=64)
    config = cc.TrainConfig(epochs=1, progress=False)
    torch.manual_seed(5)
    before = capture_rng()["cpu"]
    train_seeds([SeedRun.build("straight_through", 0, config, NET)], data)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("row", ["straight_through", "sts", "baseline_rectifier"])
def test_one_thread_cpu_trajectory_is_bit_identical(row, tmp_path):
    """On one CPU thread the batched layers round as nn.Linear does: every weight, momentum
    buffer and log entry is the sequential one exactly (S=3, two epochs of three steps)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = _digits(n_train=96)
        net = cc.ConditionalConfig(inputs=64, gater_hidden=50, gates=300)
        config = cc.for_protocol("original", epochs=2, batch_size=32, progress=False)
        gate, seeds = _gate(row, config), [0, 1, 2]
        runs = [
            SeedRun.build(gate, s, config, net, checkpoint=tmp_path / f"b{s}.ckpt") for s in seeds
        ]
        batched = train_seeds(runs, data)
        for s, b in zip(seeds, batched):
            r = SeedRun.build(gate, s, config, net)
            torch.set_rng_state(r.rng["cpu"])  # type: ignore[arg-type]
            a = cc.train(r.net, data, r.config, checkpoint=tmp_path / f"s{s}.ckpt")
            drop = ("seconds",)
            assert [{k: v for k, v in h.items() if k not in drop} for h in b.history] == [
                {k: v for k, v in h.items() if k not in drop} for h in a.history
            ]
            ca = torch.load(tmp_path / f"s{s}.ckpt", weights_only=False)
            cb = torch.load(tmp_path / f"b{s}.ckpt", weights_only=False)
            for k, v in ca["net"].items():
                assert torch.equal(cb["net"][k], v), k
            for i, st in ca["opt"]["state"].items():
                assert torch.equal(cb["opt"]["state"][i]["momentum_buffer"], st["momentum_buffer"])
            assert (b.test_error, b.test_error_stochastic) == (
                a.test_error,
                a.test_error_stochastic,
            )
    finally:
        torch.set_num_threads(threads)
