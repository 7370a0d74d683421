"""A non-editable install into a fresh virtual environment exposes only ``stochgrad``.

Builds a wheel from a copy of the source tree (no network, the build backend from the
current environment), installs it with ``--no-deps`` into a new venv, and runs the checks in a
subprocess whose working directory is a scratch folder (so the repository's own top-level
folders cannot be imported by accident). Third-party dependencies (torch, pyro, ...) come from
the current environment's site-packages, appended to the new venv's path after its own
site-packages, so the installed copy is the one imported even when the current environment
has stochgrad installed too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("estimators", "models", "analysis")

pytestmark = pytest.mark.slow


def run(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert out.returncode == 0, f"{cmd} failed:\n{out.stdout}\n{out.stderr}"
    return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")
    src.mkdir()
    for name in PACKAGES:
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    wheels = tmp / "wheels"
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(wheels),
            str(src),
        ]
    )
    (wheel,) = wheels.glob("stochgrad-*.whl")
    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            str(wheel),
        ]
    )
    # Third-party packages come from this environment, appended *after* the new venv's own
    # site-packages by a .pth line, so the freshly installed stochgrad always wins (and a
    # .pth line does not run the .pth files of the folder it adds, so an editable install
    # of this project there stays invisible).
    purelib = run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
    ).stdout.strip()
    Path(purelib, "_outer_site.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("PYTHONHOME", "PYTHONPATH"):
        env.pop(key, None)
    scratch = tmp / "elsewhere"
    scratch.mkdir()
    return {"wheel": wheel, "venv": venv, "python": python, "env": env, "cwd": scratch}


def in_venv(installed, code: str):
    return subprocess.run(
        [str(installed["python"]), "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env=installed["env"],
        cwd=installed["cwd"],
    )


def test_wheel_holds_only_the_stochgrad_namespace(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"stochgrad", next(t for t in tops if t.endswith(".dist-info"))}, tops
    for pkg in PACKAGES:
        assert f"stochgrad/{pkg}/__init__.py" in names


def test_stochgrad_imports_from_the_installed_copy(installed):
    out = in_venv(
        installed,
        (
            "import json, stochgrad.estimators as e, stochgrad.models as m;"
            "import stochgrad.analysis as a;"
            "print(json.dumps([e.__file__, m.__file__, a.__file__, e.available()]))"
        ),
    )
    assert out.returncode == 0, out.stderr
    *files, names = json.loads(out.stdout.strip().splitlines()[-1])
    for f in files:
        assert Path(f).resolve().is_relative_to(installed["venv"].resolve()), f
    assert "score_function" in names


@pytest.mark.parametrize("name", ["models", "analysis", "estimators"])
def test_generic_folder_names_are_not_importable(installed, name):
    out = in_venv(installed, f"import {name}")
    assert out.returncode != 0
    assert "ModuleNotFoundError" in out.stderr and repr(name) in out.stderr


def test_console_script(installed):
    script = installed["venv"] / "bin" / "stochgrad"
    assert script.exists()
    out = subprocess.run(
        [str(script), "--help"],
        capture_output=True,
        text=True,
        timeout=300,
        env=installed["env"],
        cwd=installed["cwd"],
    )
    assert out.returncode == 0, out.stderr
    assert "compare" in out.stdout


def test_help_and_the_parser_do_not_import_torch():
    """``stochgrad --help`` builds its parser from plain constants: no torch, no pandas."""
    code = (
        "import sys\n"
        "from stochgrad.analysis.cli import main\n"
        "try:\n"
        "    main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "try:\n"
        "    main(['compare', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = ('torch', 'pandas', 'pyro', 'scipy', 'matplotlib')\n"
        "heavy = [m for m in heavy if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert "HEAVY []" in out, out
    assert "--estimators" in out  # the compare options were printed


def test_analysis_compare_is_callable_whichever_import_comes_first():
    code = (
        "import stochgrad.analysis.compare\n"  # the submodule first: binds the package name
        "from stochgrad import analysis, models\n"
        "t = analysis.compare(models.get('toy', dim=2), ['score_function'], num_draws=50)\n"
        "from stochgrad.analysis import compare\n"
        "u = compare(models.get('toy', dim=2), ['score_function'], num_draws=50)\n"
        "print('ROWS', len(t), len(u))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    ).stdout
    assert "ROWS 1 1" in out, out
