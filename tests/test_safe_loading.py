"""Safe loading: posebooth writes safetensors only, never unpickles code, never runs remote code or a shell.

The source audit reads posebooth/ and stages/ with ``ast``; the behavioural tests put a pickle that would
run code where a weights file is expected and check that it is refused without running.
"""

from __future__ import annotations

import ast
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

SOURCES = sorted([*(ROOT / "posebooth").glob("*.py"), *(ROOT / "stages").glob("*.py")])


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def _keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_source_audit(source):
    tree = ast.parse(source.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            assert not {"pickle", "dill", "joblib", "cloudpickle", "marshal"} & {n.split(".")[0] for n in names if n}
    for call, name in _calls(tree):
        where = f"{source.relative_to(ROOT)}:{call.lineno}"
        if name == "torch.load":
            value = _keyword(call, "weights_only")
            assert isinstance(value, ast.Constant) and value.value is True, (
                f"{where}: torch.load needs weights_only=True"
            )
        trust = _keyword(call, "trust_remote_code")
        assert trust is None or (isinstance(trust, ast.Constant) and trust.value is False), f"{where}: remote code"
        shell = _keyword(call, "shell")
        assert shell is None or (isinstance(shell, ast.Constant) and shell.value is False), f"{where}: shell=True"
        assert name not in {"os.system", "os.popen", "eval", "exec", "subprocess.getoutput"}, f"{where}: {name}"
        if name in {"subprocess.run", "subprocess.Popen", "subprocess.check_output", "subprocess.check_call"}:
            command = call.args[0] if call.args else _keyword(call, "args")
            assert isinstance(command, ast.List), f"{where}: a subprocess command must be a list, never a string"
        if name.endswith("save_pretrained"):
            value = _keyword(call, "safe_serialization")
            assert value is None or (isinstance(value, ast.Constant) and value.value is True), where
        if name.endswith(".from_pretrained") and "Tokenizer" not in name and "Scheduler" not in name:
            value = _keyword(call, "use_safetensors")
            assert isinstance(value, ast.Constant) and value.value is True, f"{where}: {name} without use_safetensors"
        if name.endswith(("load_lora_weights", "load_lora_adapter", "load_textual_inversion")):
            value = _keyword(call, "use_safetensors")
            assert isinstance(value, ast.Constant) and value.value is True, f"{where}: {name} without use_safetensors"


class _Payload:
    """Unpickling this creates a marker file: the code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_stage_processes_refuse_code_in_any_torch_load(tmp_path, monkeypatch):
    """Stage processes set TORCH_FORCE_WEIGHTS_ONLY_LOAD, so a third-party library that calls
    ``torch.load(path)`` or even ``weights_only=False`` (controlnet_aux's OpenPose, torch-fidelity) cannot
    run code hidden in a weights file."""
    from posebooth import outputs

    evil = tmp_path / "body_pose_model.pth"
    evil.write_bytes(pickle.dumps({"w": _Payload(tmp_path / "ran")}))
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)  # restored after the test
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # even when the environment asks otherwise
    outputs.forbid_unpickling()
    for kwargs in ({}, {"weights_only": False}):
        with pytest.raises(pickle.UnpicklingError):
            torch.load(evil, **kwargs)
    assert not (tmp_path / "ran").exists()


def test_a_model_folder_with_a_pickled_unet_is_refused(tiny_sd, tmp_path):
    """A base-model folder whose UNet comes only as a pickle (.bin) is not loaded: base models are read from
    safetensors only."""
    from posebooth.models import load_components

    folder = tmp_path / "model"
    shutil.copytree(tiny_sd, folder)
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    state = load_file(str(weights))
    weights.unlink()
    torch.save({**state, "evil": _Payload(tmp_path / "ran")}, folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors|diffusion_pytorch_model"):
        load_components(str(folder), "cpu", "fp32")
    assert not (tmp_path / "ran").exists()


def test_everything_posebooth_writes_is_safetensors(tiny_sd, tmp_path):
    """Every method's saved output holds weights only as .safetensors (plus JSON and text)."""
    import copy

    import yaml

    from posebooth import config, methods
    from posebooth.models import load_components
    from tests.profile import apply_profile

    params = apply_profile(yaml.safe_load((ROOT / "params.yaml").read_text()))
    comp0 = load_components(tiny_sd, "cpu", "fp32")
    for method in config.METHODS:
        raw = copy.deepcopy(params["train"]) | {"method": method}
        t = config.build_section("train", raw)
        comp = copy.deepcopy(comp0)
        for phase in methods.phases(method):
            methods.setup(phase, comp, t, "sks", "robot")
        out = tmp_path / method
        out.mkdir()
        files = methods.save(method, comp, out, t, "sks")
        assert files
        suffixes = {p.suffix for p in out.rglob("*") if p.is_file()}
        assert ".safetensors" in suffixes and suffixes <= {".safetensors", ".json", ".txt", ".md"}, (method, suffixes)
