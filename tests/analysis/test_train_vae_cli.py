"""``stochgrad train --model vae``: logs, figures, exact resumption, one-line errors."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from stochgrad.analysis import cli

TINY = [
    "train", "--model", "vae", "--estimators", "disarm",
    "score_function:baseline=leave_one_out,num_samples=2", "--seeds", "1", "--steps", "4",
    "--eval-every", "2", "--batch", "10", "--eval-size", "60", "--variance-draws", "3",
    "--test-samples", "4", "--no-progress", "--threads", "1",
]  # fmt: skip
#: Architecture kept tiny through the library call (the CLI trains 200 latents).
SMALL = dict(latents=6, hidden=8)


@pytest.fixture(autouse=True)
def digits_only(monkeypatch):
    """Pretend MNIST is absent: runs use the shipped 8x8 digits (fast)."""
    import stochgrad.models.data as data_module

    monkeypatch.setattr(data_module, "default_mnist_path", lambda cwd=None: None)


def _library_run(out, steps=6, **kw):
    from stochgrad.analysis.train_vae import run_train_vae

    opts = dict(
        arch="nonlinear", steps=steps, seeds=2, batch=10, eval_every=2, eval_size=60,
        test_samples=4, iw_size=20, variance_draws=3, out=out, progress=False, echo=None,
        plots=False, **SMALL,
    )  # fmt: skip
    opts.update(kw)
    return run_train_vae(["disarm", "straight_through"], **opts)


def _numbers(table):
    return table.drop(columns="seconds").reset_index(drop=True)


def test_cli_writes_logs_and_figures(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main([*TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "after 4 steps" in printed and "disarm" in printed
    curves = pd.read_csv(out / "curves.csv")
    assert len(curves) == 2 * 3  # estimators x evaluations (steps 0, 2, 4)
    assert sorted(curves["step"].unique()) == [0, 2, 4]
    last = curves[curves["step"] == 4]
    assert last[["train_elbo", "test_elbo", "test_iw", "log_var_encoder"]].notna().all().all()
    assert (curves["batch_elbo"].isna() == (curves["step"] == 0)).all()
    cells = sorted(p.relative_to(out).as_posix() for p in (out / "cells").rglob("*.csv"))
    assert cells == [
        "cells/disarm/seed0.csv",
        "cells/score_function_baseline_leave_one_out_num_samples_2/seed0.csv",
    ]  # fmt: skip
    for name in ("elbo", "log_variance"):
        for ext in ("png", "pdf"):
            assert (out / "figures" / f"{name}.{ext}").stat().st_size > 1000
    config = json.loads((out / "run.json").read_text())["config"]
    assert config["arch"] == "linear" and config["lr"] == 1e-4 and config["latents"] == 200
    # a re-run of the finished command trains nothing and reprints the same table
    assert cli.main([*TINY, "--out", str(out)]) == 0
    assert (
        pd.read_csv(out / "curves.csv")
        .drop(columns="seconds")
        .equals(curves.drop(columns="seconds"))
    )


def test_killed_run_resumes_to_the_uninterrupted_numbers(tmp_path, monkeypatch):
    from stochgrad.models.vae_objective import VAETrainer

    whole = _library_run(tmp_path / "whole")
    calls = {"n": 0}
    step = VAETrainer.train_step

    def dying(self):
        calls["n"] += 1
        if calls["n"] == 12:  # mid-round: 4 cells x 2 steps per round
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(VAETrainer, "train_step", dying)
    with pytest.raises(KeyboardInterrupt):
        _library_run(tmp_path / "split")
    monkeypatch.setattr(VAETrainer, "train_step", step)
    cells = tmp_path / "split" / "cells"
    # each cell holds the rows up to its last checkpoint: disarm seed 0 finished round 2,
    # seed 1 was killed during it
    assert pd.read_csv(cells / "disarm" / "seed0.csv")["step"].max() == 4
    assert pd.read_csv(cells / "disarm" / "seed1.csv")["step"].max() == 2
    resumed = _library_run(tmp_path / "split")
    pd.testing.assert_frame_equal(_numbers(resumed), _numbers(whole), check_exact=True)


def test_extending_steps_continues_the_same_run(tmp_path):
    whole = _library_run(tmp_path / "whole", steps=6)
    _library_run(tmp_path / "ext", steps=2)
    extended = _library_run(tmp_path / "ext", steps=6)
    pd.testing.assert_frame_equal(_numbers(extended), _numbers(whole), check_exact=True)


def test_resume_with_other_settings_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    _library_run(out, steps=2)
    with pytest.raises(ValueError, match=r"other settings \(lr"):
        _library_run(out, steps=2, lr=1e-3)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--steps", "5"], "--steps 5 must be a multiple of --eval-every 2"),
        (["--seeds", "0"], "--seeds must be an int >= 1"),
        (["--variance-draws", "1"], "--variance-draws must be 0 (off) or >= 2"),
        (["--batch", "0"], "--batch must be an int >= 1"),
        (["--lr", "-1"], "--lr must be a positive finite number"),
        (["--model", "vae:arch=linear", "--arch", "nonlinear"], "disagree"),
        (["--model", "vae:steps=3"], "takes only arch="),
        (["--estimators", "nope"], "unknown estimator 'nope'"),
        (["--device", "cuda:0"], "cuda"),
    ],
)
def test_bad_options_exit_with_one_line(tmp_path, capsys, extra, message):
    assert cli.main([*TINY, "--out", str(tmp_path / "x"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stochgrad train: error:") and len(err.splitlines()) == 1
    assert message in err


def test_vae_options_refused_for_other_models(capsys):
    assert cli.main(["train", "--model", "sbn", "--arch", "linear", "--no-progress"]) == 2
    assert "--arch: only for --model vae" in capsys.readouterr().err
