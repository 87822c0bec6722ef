"""The platform locks (locks/*.txt) agree with each other, with pyproject.toml and with the Makefile.

No network: these read the files only. `make check-locks` (scripts/check_locks.py) asks PyPI whether each lock
resolves on its platform for each Python; this catches, in a second, a lock forgotten when a pin changes.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _load_checker():
    spec = importlib.util.spec_from_file_location("check_locks", ROOT / "scripts" / "check_locks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


check_locks = _load_checker()
PLATFORMS = check_locks.PLATFORMS
PYTHONS = check_locks.PYTHONS
REFERENCE = "linux-x86_64"  # the lock the others follow: CI and `make test` run on it
# What only torch's CUDA build on Linux needs.
CUDA_ONLY = re.compile(r"^(nvidia-(?!ml-py$).+|cuda-.+|triton)$")
# What a platform pins beyond the reference lock (its own Requires-Dist markers).
PLATFORM_ONLY = {"windows-x86_64": {"pywin32", "tzdata", "pyreadline3"}}
CPU_BUILDS = {"torch", "torchvision"}  # in the CPU lock: the same versions, PyTorch's +cpu builds


def pins(platform: str, python: str) -> dict:
    """{canonical name: Pin} that `pip install -r` would take on `platform` with `python`."""
    lock = check_locks.read_lock(ROOT / PLATFORMS[platform].lock)
    return check_locks.select(lock, check_locks.environment(PLATFORMS[platform], python))


COMBOS = [(p, py) for p in PLATFORMS for py in PYTHONS]


def disagreements(platform: str, python: str, mine: dict, reference: dict) -> list[str]:
    """How `mine` (a platform's pins) differs from the reference lock's beyond what the platform explains."""
    out = []
    cuda = {key for key in reference if CUDA_ONLY.match(key)}
    expected = set(reference) - (cuda if platform != REFERENCE else set())
    for key in sorted(expected - set(mine)):
        out.append(f"{platform} / {python}: {reference[key].name}=={reference[key].version} is missing")
    for key in sorted(set(mine) - expected - PLATFORM_ONLY.get(platform, set())):
        out.append(f"{platform} / {python}: {mine[key].name}=={mine[key].version} is not in {REFERENCE}")
    for key in sorted(expected & set(mine)):
        a, b = Version(mine[key].version), Version(reference[key].version)
        if a.public != b.public or (a.local and not (platform.endswith("-cpu") and key in CPU_BUILDS)):
            out.append(f"{platform} / {python}: {mine[key].name}=={a} but {REFERENCE} pins {b}")
    return out


@pytest.mark.parametrize(("platform", "python"), COMBOS)
def test_each_lock_pins_each_package_once_for_each_python(platform, python):
    chosen = pins(platform, python)  # raises on a package pinned twice for one Python
    assert len(chosen) > 100


def test_every_lock_is_checked_and_the_makefile_names_existing_locks():
    files = {path.relative_to(ROOT).as_posix() for path in (ROOT / "locks").glob("*.txt")}
    assert files == {p.lock for p in PLATFORMS.values()}, "a lock that scripts/check_locks.py does not check"
    named = set(re.findall(r"locks/[\w.-]+\.txt", (ROOT / "Makefile").read_text()))
    assert named and named <= files
    assert not (ROOT / "requirements.txt").exists(), "the locks are in locks/: a stale requirements.txt misleads"


def test_supported_pythons_agree():
    pyproject = check_locks.tomllib.loads((ROOT / "pyproject.toml").read_text())
    supported = SpecifierSet(pyproject["project"]["requires-python"])
    minors = [f"3.{m}" for m in range(8, 16) if Version(f"3.{m}.0") in supported]
    assert minors == list(PYTHONS) == ["3.10", "3.11", "3.12", "3.13"]
    assert "(3, 10) <= v[:2] <= (3, 13)" in (ROOT / "Makefile").read_text()
    assert pyproject["tool"]["ruff"]["target-version"] == "py310"


@pytest.mark.parametrize(("platform", "python"), COMBOS)
def test_pyproject_pins_are_the_locks_pins(platform, python):
    env = check_locks.environment(PLATFORMS[platform], python)
    chosen = pins(platform, python)
    covered = set()
    for req in check_locks.project_requirements():
        key = canonicalize_name(req.name)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        covered.add(key)
        assert key in chosen, f"pyproject.toml needs {req}; {platform} does not pin it for Python {python}"
        assert Version(chosen[key].version) in req.specifier, f"{platform} / {python}: {chosen[key].version} vs {req}"
        assert all(s.operator == "==" for s in req.specifier), f"pyproject.toml pins exactly: {req}"
    every = {canonicalize_name(r.name) for r in check_locks.project_requirements()}
    assert covered == every, f"pyproject.toml has no pin for Python {python}: {sorted(every - covered)}"


def test_torch_and_torchvision_are_the_same_everywhere():
    pyproject = {canonicalize_name(r.name): r for r in check_locks.project_requirements()}
    for name in ("torch", "torchvision"):
        versions = {}
        for platform, python in COMBOS:
            version = Version(pins(platform, python)[name].version)
            versions[(platform, python)] = version
            assert version.local == ("cpu" if platform.endswith("-cpu") else None), (platform, python, version)
        assert {v.public for v in versions.values()} == {str(next(iter(pyproject[name].specifier)).version)}


@pytest.mark.parametrize(("platform", "python"), [c for c in COMBOS if c[0] != REFERENCE])
def test_other_locks_follow_the_linux_lock(platform, python):
    """Same pins as locks/linux-x86_64.txt, less the CUDA ones, plus what the platform alone needs."""
    assert disagreements(platform, python, pins(platform, python), pins(REFERENCE, python)) == []


def test_a_pin_changed_in_one_lock_only_is_caught():
    reference = pins(REFERENCE, "3.12")
    mine = dict(pins("macos-arm64", "3.12"))
    numpy = mine["numpy"]
    mine["numpy"] = check_locks.Pin(numpy.name, numpy.key, "2.3.5", None, numpy.line)  # forgotten in this lock
    del mine["scipy"]  # a package added to the Linux lock only
    mine["cuda-bindings"] = reference["cuda-bindings"]  # a CUDA pin where it cannot install
    found = disagreements("macos-arm64", "3.12", mine, reference)
    assert [f.split(": ", 1)[1].split("==")[0] for f in found] == ["scipy", "cuda-bindings", "numpy"]


@pytest.mark.parametrize("python", PYTHONS)
def test_the_linux_lock_is_torchs_cuda_environment(python):
    linux = pins(REFERENCE, python)
    cuda = {key for key in linux if CUDA_ONLY.match(key)}
    assert {"triton", "cuda-toolkit", "cuda-bindings", "nvidia-cudnn-cu13", "nvidia-nccl-cu13"} <= cuda
    for platform in PLATFORMS:
        if platform != REFERENCE:
            assert not cuda & set(pins(platform, python)), f"{platform} pins CUDA packages"


@pytest.mark.parametrize(("platform", "python"), COMBOS)
def test_every_lock_has_the_installer_and_none_has_opencv_python(platform, python):
    chosen = pins(platform, python)
    assert {"pip", "setuptools", "opencv-python-headless"} <= set(chosen)
    assert Version(chosen["pip"].version) >= check_locks.MIN_PIP  # `make check-locks` needs it
    # rtmlib asks for these; they would overwrite opencv-python-headless's cv2 (see the Makefile).
    assert not {"opencv-python", "opencv-contrib-python"} & set(chosen)
    assert {canonicalize_name(n) for n in check_locks.SDISTS} <= set(chosen)


def test_only_the_cpu_lock_uses_another_index():
    for platform in PLATFORMS.values():
        indexes = check_locks.read_lock(ROOT / platform.lock).indexes
        expected = ["https://download.pytorch.org/whl/cpu"] if platform.name.endswith("-cpu") else []
        assert indexes == expected, platform.name


def test_read_lock_refuses_what_a_lock_must_not_hold(tmp_path):
    for bad in ("numpy>=2", "numpy", "numpy[extra]==2.2.6", "-e .", "--index-url https://example.org/simple"):
        (tmp_path / "lock.txt").write_text(f"{bad}\n")
        with pytest.raises(check_locks.LockError):
            check_locks.read_lock(tmp_path / "lock.txt")
    (tmp_path / "lock.txt").write_text('numpy==2.2.6; python_version < "3.11"\nnumpy==2.4.6  # no marker\n')
    lock = check_locks.read_lock(tmp_path / "lock.txt")
    with pytest.raises(check_locks.LockError, match="pinned twice"):
        check_locks.select(lock, check_locks.environment(PLATFORMS[REFERENCE], "3.10"))
    assert check_locks.select(lock, check_locks.environment(PLATFORMS[REFERENCE], "3.11"))["numpy"].version == "2.4.6"
