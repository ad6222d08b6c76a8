"""Layout, wheel contents, the public API and the CLI."""

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import diffusers_ext
from diffusers_ext.cli import main
from diffusers_ext.components import COMPONENTS, components_markdown_table, list_components

ROOT = Path(__file__).resolve().parents[1]


def test_subpackages_import_from_the_repository_folders():
    import diffusers_ext.pipelines
    import diffusers_ext.schedulers
    import diffusers_ext.training

    assert Path(diffusers_ext.schedulers.__file__).parent == ROOT / "schedulers"
    assert Path(diffusers_ext.pipelines.__file__).parent == ROOT / "pipelines"
    assert Path(diffusers_ext.training.__file__).parent == ROOT / "training"


def test_import_is_lazy():
    code = "import sys, diffusers_ext; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_every_listed_component_is_importable_from_the_top_level():
    for component in COMPONENTS:
        assert getattr(diffusers_ext, component.name).__name__ == component.name
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        diffusers_ext.Nope  # noqa: B018


@pytest.mark.slow
def test_wheel_contains_every_subpackage_and_card_and_imports_from_it(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
    )
    (wheel,) = tmp_path.glob("diffusers_ext-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    # Every package folder of the source tree, under the installed name it maps to.
    sources = {"diffusers_ext": ROOT / "diffusers_ext", "diffusers_ext/schedulers": ROOT / "schedulers",
               "diffusers_ext/pipelines": ROOT / "pipelines", "diffusers_ext/training": ROOT / "training"}
    for installed, folder in sources.items():
        for init in folder.rglob("__init__.py"):
            assert f"{installed}/{init.relative_to(folder).as_posix()}" in names, init
    for card in (ROOT / "hub_cards").glob("*.md"):
        assert f"diffusers_ext/hub_cards/{card.name}" in names
    for shipped in (ROOT / "diffusers_ext" / "assets").rglob("*"):
        if shipped.is_file():
            assert f"diffusers_ext/{shipped.relative_to(ROOT / 'diffusers_ext').as_posix()}" in names, shipped
    assert not any(name.startswith(("tests/", "benchmarks/")) for name in names)

    unpacked = tmp_path / "unpacked"
    zipfile.ZipFile(wheel).extractall(unpacked)
    code = (
        "import diffusers_ext.schedulers, diffusers_ext.pipelines, diffusers_ext.training, diffusers_ext.hub;"
        "from diffusers_ext.hub import available_card_templates;"
        "print(diffusers_ext.schedulers.__file__); print(available_card_templates())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(unpacked), "PATH": ""},
        capture_output=True, text=True, check=True,
    ).stdout
    assert out.splitlines()[0].startswith(str(unpacked))
    assert "'pipeline'" in out


def test_readme_feature_table_is_the_generated_one():
    readme = (ROOT / "README.md").read_text()
    table = re.search(r"<!-- components:start -->\n(.*?)\n<!-- components:end -->", readme, re.S).group(1)
    assert table == components_markdown_table()


def test_readme_and_ci_name_the_two_commands():
    readme = (ROOT / "README.md").read_text()
    assert "make demo" in readme and "make test" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_cli_list(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(c.name in out for c in list_components())
    main(["list", "--markdown"])
    assert capsys.readouterr().out.strip() == components_markdown_table()
    assert list_components("no-such-kind") == []


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "diffusers-ext"
    out = subprocess.run([str(script), "list", "--kind", "oracle"], capture_output=True, text=True, check=True).stdout
    assert "GaussianMixtureDenoiser" in out
