"""dvc.yaml and the code agree: params exist, scripts exist, every imported library module is a dep."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from posebooth import config
from tests.conftest import ROOT

DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PARAMS = config.read_yaml(ROOT / "params.yaml")
STAGES = DVC["stages"]
EXPECTED = [
    "prepare_images", "generate_class_priors", "extract_poses", "train_stage1_appearance",
    "train_stage2_pose", "sample", "evaluate",
]  # fmt: skip


def _library_imports(path: Path) -> set[str]:
    """``posebooth.*`` modules imported by a file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("posebooth"):
            found.add(node.module)
            package = ROOT / node.module.replace(".", "/")
            if package.is_dir():  # `from posebooth.world import scenes`: the submodules named
                found |= {f"{node.module}.{a.name}" for a in node.names if (package / f"{a.name}.py").exists()}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("posebooth.")}
    return found


def _closure(script: Path) -> set[str]:
    """Library module files a script uses, directly or through other library modules."""
    todo, seen = list(_library_imports(script)), set()
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        todo += _library_imports(_file(mod))
    return {str(_file(mod).relative_to(ROOT)) for mod in seen}


def _file(module: str) -> Path:
    """The file of a ``posebooth.*`` module: ``a/b.py``, or ``a/b/__init__.py`` for a package."""
    path = ROOT / module.replace(".", "/")
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _loaded_sections(script: Path) -> set[str]:
    """Sections named in the script's ``config.load([...])`` call."""
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "load":
            return {elt.value for elt in node.args[0].elts}
    raise AssertionError(f"{script} never calls config.load")


def test_the_seven_stages_in_order():
    assert list(STAGES) == EXPECTED


@pytest.mark.parametrize("stage", EXPECTED)
def test_stage_contract(stage):
    spec = STAGES[stage]
    script = ROOT / "stages" / f"{stage}.py"
    assert script.exists()
    # Training stages run under common.train_launcher (python, or accelerate launch for several processes).
    launcher = "${common.train_launcher}" if stage.startswith("train_") else "python"
    assert spec["cmd"] == f"{launcher} -m stages.{stage}"
    deps = set(spec["deps"])
    assert f"stages/{stage}.py" in deps
    missing = _closure(script) - deps
    assert not missing, f"{stage}: library modules used but not listed in deps: {sorted(missing)}"
    for key in spec["params"]:  # every listed param exists in params.yaml
        section, _, sub = key.partition(".")
        assert section in PARAMS and (not sub or sub in PARAMS[section]), f"{stage}: {key} not in params.yaml"
    listed_sections = {k.partition(".")[0] for k in spec["params"]}
    assert listed_sections == _loaded_sections(script), f"{stage}: params sections differ from config.load"


def test_params_file_has_exactly_the_known_sections():
    assert set(PARAMS) == set(config.SECTIONS)
    config.load(config.SECTIONS, ROOT / "params.yaml")


def test_metrics_are_uncached_and_committable():
    for stage, spec in STAGES.items():
        for entry in spec.get("metrics", []):
            ((path, opts),) = entry.items()
            assert opts == {"cache": False}, stage
            assert path == f"metrics/{stage}.json"


def _cached_outs(spec: dict) -> set[str]:
    """A stage's outs that go to the DVC cache (and so to a remote): all but the `cache: false` ones."""
    found = set()
    for out in spec.get("outs", []):
        path, opts = (out, {}) if isinstance(out, str) else next(iter(out.items()))
        if (opts or {}).get("cache", True):
            found.add(path)
    return found


def test_artifacts_name_the_cached_model_outputs():
    """`dvc artifacts get` downloads an artifact's path from the remote: it must be a stage's cached output (a
    `cache: false` one is in git, never pushed), under a name that DVC and the model registry accept."""
    from dvc.repo.artifacts import check_name_format

    made_by = {"subject-adapter": "train_stage1_appearance", "pose-controlnet": "train_stage2_pose"}
    assert set(DVC["artifacts"]) == set(made_by)
    for name, artifact in DVC["artifacts"].items():
        check_name_format(name)
        assert artifact["type"] == "model" and artifact["desc"] and artifact["labels"], name
        assert artifact["path"] in _cached_outs(STAGES[made_by[name]]), f"{name}: {artifact['path']}"
