"""Run-level values, non-finite draws, oversized requests and CLI errors fail clearly."""

from __future__ import annotations

import pytest
import torch

from stochgrad import estimators, models
from stochgrad.analysis.cli import main
from stochgrad.estimators.checks import NonFiniteDrawsError


class _HalfNaN(models.lookup("toy")):  # type: ignore[misc]
    def model(self, params):
        c = super().model(params)
        return torch.where(torch.arange(c.shape[0]) % 2 == 0, c, torch.nan)


@pytest.mark.parametrize("chunk_size", [None, 10])
def test_non_finite_draws_raise_naming_model_estimator_and_fraction(chunk_size):
    # Chunks are checked as they are drawn; the count covers all of them.
    with pytest.raises(
        NonFiniteDrawsError, match=r"score_function on _HalfNaN.*50 of 100 draws \(50\.0%\)"
    ):
        estimators.get("score_function").estimate(
            _HalfNaN(dim=5), 100, seed=0, chunk_size=chunk_size
        )


def test_huge_request_refused_up_front_with_size_and_way_out():
    with pytest.raises(ValueError, match=r"GiB.*ask for at most \d+ draws"):
        estimators.get("score_function").estimate(models.get("toy"), 10**9)


BAD = [
    ["compare", "--draws", "0"],
    ["compare", "--draws", "1"],
    ["compare", "--draws", "-5"],
    ["compare", "--level", "0"],
    ["compare", "--level", "1.5"],
    ["compare", "--seed", str(2**70)],
    ["compare", "--max-evals", "-5"],
    ["compare", "--threads", "-1"],
    ["sweep", "--grid", "abc"],
    ["train", "--steps", "0"],
    ["train", "--lr", "-1"],
    ["train", "--batch", "0"],
    ["train", "--eval-every", "0"],
]


@pytest.mark.parametrize("argv", BAD, ids=lambda a: " ".join(a))
def test_bad_run_values_exit_nonzero_in_one_line_and_leave_no_directory(argv, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main([*argv, "--out", str(out), "--no-progress", "--no-plots"])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert len(err.splitlines()) == 1 and "error:" in err and "Traceback" not in err
    assert not out.exists()


def test_truncated_npz_names_the_file(tmp_path):
    import io

    import numpy as np

    from stochgrad.models.data import NPZ_KEYS, load_mnist

    buf = io.BytesIO()
    np.savez(
        buf, **{k: np.zeros((4, 28, 28) if k.startswith("x") else 4, np.uint8) for k in NPZ_KEYS}
    )
    f = tmp_path / "mnist.npz"
    f.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ValueError, match="mnist.npz"):
        load_mnist(f)
