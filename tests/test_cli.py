"""The ``diffusers-ext`` command as a user meets it: user errors are one line on stderr with exit status 2, found
before any model is loaded (or torch imported), and output piped to a closed reader ends quietly."""

import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from diffusers_ext.cli import main, resolve_scheduler


def run_cli(*arguments: str) -> subprocess.CompletedProcess:
    """``diffusers-ext ARGUMENTS`` in a fresh interpreter that reports, after the command, whether torch was imported."""
    code = ("import atexit, sys; atexit.register(lambda: print('torch imported:', 'torch' in sys.modules)); "
            "from diffusers_ext.cli import main; sys.exit(main(sys.argv[1:]))")
    return subprocess.run([sys.executable, "-c", code, *arguments], capture_output=True, text=True, timeout=120)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr
    return result.stderr.strip().splitlines()[-1]


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "low.png"
    PIL.Image.fromarray((np.random.default_rng(0).random((100, 80, 3)) * 255).astype(np.uint8)).save(path)
    return path


def test_restore_checks_its_arguments_before_loading_anything(photo, tmp_path):
    cases = {
        (str(tmp_path / "missing.png"), str(tmp_path / "out.png")): "no input image",
        (str(photo), str(tmp_path / "out.txt")): "image extension",
        (str(photo), str(tmp_path / "out.png"), "--scale", "64"): "MP limit",
    }
    for arguments, message in cases.items():
        result = run_cli("restore", *arguments)
        assert message in one_line_error(result)
        assert "torch imported: False" in result.stdout
    for flag in ("--steps", "--scale"):
        assert "positive integer" in one_line_error(run_cli("restore", str(photo), str(tmp_path / "o.png"), flag, "0"))
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob("o.png"))


def test_list_refuses_an_unknown_kind_and_survives_a_closed_pipe():
    assert "invalid choice" in one_line_error(run_cli("list", "--kind", "foo"))
    listing = subprocess.run(f"{sys.executable} -m diffusers_ext.cli list --markdown | head -n 1", shell=True,
                             capture_output=True, text=True, timeout=120)
    assert listing.stdout.startswith("|") and listing.stderr == ""


def test_demo_refuses_an_unknown_part():
    assert "not a part of the demo" in one_line_error(run_cli("demo", "everything"))


def test_bench_takes_schedulers_by_name_or_module_path():
    from diffusers import DEISMultistepScheduler

    from diffusers_ext.schedulers import ERSDESolverScheduler

    assert resolve_scheduler("DEIS") == ("DEIS", DEISMultistepScheduler)
    assert resolve_scheduler("ERSDESolverScheduler") == ("ERSDESolverScheduler", ERSDESolverScheduler)
    assert resolve_scheduler("diffusers_ext.schedulers:ERSDESolverScheduler")[1] is ERSDESolverScheduler
    with pytest.raises(ValueError, match="not a scheduler"):
        resolve_scheduler("UNet2DModel")


def test_bench_reports_a_bad_scheduler_as_a_usage_error(capsys):
    assert main(["bench", "sampler-accuracy", "--scheduler", "NoSuchScheduler"]) == 2
    assert "not a scheduler" in capsys.readouterr().err


def test_bench_speed_hooks_checks_its_options_before_importing_torch():
    for arguments, message in {("--sections", "sd15,everything"): "unknown 'everything'",
                               ("--methods", "faster-diffusion,deepcache"): "unknown 'deepcache'",
                               ("--steps", "0"): "positive integer"}.items():
        result = run_cli("bench", "speed-hooks", *arguments)
        assert message in one_line_error(result)
        assert "torch imported: False" in result.stdout


def test_bench_speed_hooks_runs_the_sections_it_is_given_and_writes_its_table_and_plot(tmp_path, monkeypatch, capsys):
    """The command's plumbing, with the two cheap-to-stub sections standing in for the measurements (the real ones
    take minutes; benchmarks/speed_hooks.py runs them)."""
    from diffusers_ext.hooks import benchmark

    row = benchmark.Row("trained", "faster-diffusion", float("nan"), float("nan"), float("nan"), float("nan"),
                        float("nan"), 15, 35.0, 0.9, "stub")
    stitch = [benchmark.StitchRow(2, 1, fraction, 0.1 + fraction, fraction, 0.01) for fraction in (0.0, 0.4, 1.0)]
    ran = []
    monkeypatch.setattr(benchmark, "trained_section", lambda: ran.append("trained") or [row])
    monkeypatch.setattr(benchmark, "oracle_section", lambda: ran.append("oracle") or stitch)
    assert main(["bench", "speed-hooks", "--sections", "trained,oracle", "--output", str(tmp_path)]) == 0
    assert ran == ["trained", "oracle"]
    assert (tmp_path / "speed_hooks.csv").read_text().splitlines()[1].startswith("trained,faster-diffusion")
    assert (tmp_path / "speed_hooks.png").stat().st_size > 0
    assert "35.0" in capsys.readouterr().out
