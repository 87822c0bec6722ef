#!/usr/bin/env python3
"""Check that every platform's lock installs on every supported Python, without installing or downloading it.

For each lock in locks/ (see PLATFORMS) and each Python in PYTHONS, pip resolves the lock for that target the
way `make` installs it (--no-deps, every pin exact) without the target's interpreter:

    pip install --dry-run --no-deps --platform P --python-version V --implementation cp --only-binary=:all: -r LOCK

so a pin with no wheel for that platform and Python, or whose Requires-Python refuses it, fails. Then the
metadata that pip read is checked: every dependency (Requires-Dist) that applies on the target is pinned in
the same lock at a version that satisfies it, and every pin is needed by something.

Environment markers in a lock are evaluated here for the target, not by pip (pip 26 still evaluates them for
the interpreter that runs it, whatever --platform and --python-version say), and pip gets the selected pins.

Nothing is installed and no wheel is downloaded: pip reads wheel metadata from the index's PEP 658 files where
it serves them, else through HTTP range requests into the wheel (--use-feature=fast-deps); pip >= 25.3 does
so in dry runs instead of downloading wheels. Index pages are fetched once into a temporary local index that
every pip run reads, cut to the pinned versions (pip would re-fetch pages that come without cache headers,
some 40 MB per run, and parse thousands of links). The only files downloaded whole are the sdists in SDISTS
(small, pure Python) and their build backend. All of it: about 150 MB and 3 minutes for 16 targets.

    python scripts/check_locks.py                      # every platform, Python 3.10 to 3.13
    python scripts/check_locks.py --platform macos-arm64 --python 3.13

Exit status 0 when every platform and Python resolves, 1 otherwise, each failure naming the platform, the
Python and the package. Pins that only an unreachable extra index (the PyTorch CPU index, for the Linux CPU
lock) serves are reported as not verified; --strict makes that a failure too.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import html
import html.parser
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

try:
    from packaging.markers import Marker
    from packaging.requirements import Requirement
    from packaging.tags import mac_platforms
    from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename
    from packaging.version import InvalidVersion, Version
except ImportError:  # the interpreter's own pip carries a copy
    from pip._vendor.packaging.markers import Marker
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.tags import mac_platforms
    from pip._vendor.packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename
    from pip._vendor.packaging.version import InvalidVersion, Version

try:
    import tomllib  # novermin
except ImportError:  # Python 3.10: the locks pin tomli there (pytest needs it)
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
PYTHONS = ("3.10", "3.11", "3.12", "3.13")
MIN_PIP = Version("25.3")  # older pips download whole wheels in a dry run (torch alone is 0.5 GB per target)


def _manylinux(arch: str, glibc_minor: int) -> tuple[str, ...]:
    """pip's --platform takes each tag literally: list every manylinux tag a glibc 2.<glibc_minor> system takes."""
    tags = [f"manylinux_2_{minor}_{arch}" for minor in range(glibc_minor, 16, -1)]
    return (*tags, f"manylinux2014_{arch}", f"manylinux2010_{arch}", f"manylinux1_{arch}")


def _macos(arch: str, major: int) -> tuple[str, ...]:
    """Every macOS tag a macOS <major> system takes (universal2 back to 10.4)."""
    return tuple(mac_platforms((major, 0), arch))


_LINUX = {"sys_platform": "linux", "platform_system": "Linux", "os_name": "posix", "platform_machine": "x86_64"}
_MACOS = {"sys_platform": "darwin", "platform_system": "Darwin", "os_name": "posix", "platform_machine": "arm64"}
_WINDOWS = {"sys_platform": "win32", "platform_system": "Windows", "os_name": "nt", "platform_machine": "AMD64"}


@dataclass(frozen=True)
class Platform:
    name: str
    lock: str  # relative to the repository root
    tags: tuple[str, ...]  # pip --platform values
    markers: dict


PLATFORMS = {
    p.name: p
    for p in (
        # glibc 2.28 (RHEL 8, Debian 10, Ubuntu 20.04 and later): torch's wheels are manylinux_2_28
        Platform("linux-x86_64", "locks/linux-x86_64.txt", _manylinux("x86_64", 28), _LINUX),  # CUDA torch
        Platform("linux-x86_64-cpu", "locks/linux-x86_64-cpu.txt", _manylinux("x86_64", 28), _LINUX),
        # macOS 14 on Apple silicon: torch's wheels are macosx_14_0_arm64
        Platform("macos-arm64", "locks/macos-arm64.txt", _macos("arm64", 14), _MACOS),
        Platform("windows-x86_64", "locks/windows-x86_64.txt", ("win_amd64",), _WINDOWS),
    )
}

# Pinned packages that PyPI has no wheel of: pip may take their sdist (pure Python, built on install).
SDISTS = {"antlr4-python3-runtime"}
# Requirements that the locks leave out on purpose: `make` installs --no-deps, so they are never installed.
UNPINNED_ON_PURPOSE = {
    # rtmlib (DWPose) only needs cv2, which opencv-python-headless provides; these two would overwrite it.
    ("rtmlib", "opencv-python"),
    ("rtmlib", "opencv-contrib-python"),
}
# Pinned though no Requires-Dist (that applies) names them.
ROOTS = {
    "pip": "the installer: pip >= 25.3 lets this check read metadata without downloading wheels",
    "setuptools": "the build backend of posebooth's editable install (--no-build-isolation)",
    "ruamel-yaml-clib": "ruamel.yaml's C parser (its oldlibyaml extra): halves a no-op `dvc repro`",
}


class LockError(ValueError):
    pass


@dataclass(frozen=True)
class Pin:
    name: str  # as written
    key: str  # canonical
    version: str
    marker: Marker | None
    line: int

    def applies(self, env: dict) -> bool:
        return self.marker is None or self.marker.evaluate(env)


@dataclass
class Lock:
    path: Path
    indexes: list[str] = field(default_factory=list)  # --extra-index-url values
    pins: list[Pin] = field(default_factory=list)


def read_lock(path: Path) -> Lock:
    """A lock: `name==version` lines, each with an optional environment marker, comments, --extra-index-url."""
    lock = Lock(Path(path))
    for number, raw in enumerate(Path(path).read_text().splitlines(), 1):
        line = re.sub(r"(^|\s)#.*", "", raw).strip()
        if not line:
            continue
        where = f"{path}:{number}"
        if line.startswith("-"):
            option, _, value = line.partition(" ")
            if option != "--extra-index-url" or not value.strip().startswith(("https://", "http://")):
                raise LockError(f"{where}: only --extra-index-url http(s)://... is allowed among options: {raw!r}")
            lock.indexes.append(value.strip())
            continue
        try:
            req = Requirement(line)
        except Exception as e:
            raise LockError(f"{where}: not a requirement: {raw!r} ({e})") from None
        specs = list(req.specifier)
        if req.extras or req.url or len(specs) != 1 or specs[0].operator != "==" or "*" in specs[0].version:
            raise LockError(f"{where}: a lock pins one exact version (name==version): {raw!r}")
        lock.pins.append(Pin(req.name, canonicalize_name(req.name), specs[0].version, req.marker, number))
    return lock


def environment(platform: Platform, python: str) -> dict:
    """Marker variables of a CPython `python` (major.minor) on `platform`."""
    return {
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "python_version": python,
        "python_full_version": f"{python}.0",
        "implementation_version": f"{python}.0",
        "platform_release": "",
        "platform_version": "",
        "extra": "",
        **platform.markers,
    }


def select(lock: Lock, env: dict) -> dict[str, Pin]:
    """The pins that apply in `env`, by canonical name; two for one name is an error."""
    chosen: dict[str, Pin] = {}
    for pin in lock.pins:
        if pin.applies(env):
            if pin.key in chosen:
                raise LockError(
                    f"{lock.path}: {pin.name} is pinned twice for Python {env['python_version']} on "
                    f"{env['sys_platform']} (lines {chosen[pin.key].line} and {pin.line})"
                )
            chosen[pin.key] = pin
    return chosen


def project_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[Requirement]:
    """posebooth's direct dependencies and its dev extra's."""
    project = tomllib.loads(pyproject.read_text())["project"]
    lines = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        lines += extra
    return [Requirement(line) for line in lines]


# ---------------------------------------------------------------------------------------------- index snapshot


class _Anchors(html.parser.HTMLParser):
    def __init__(self, base: str):
        super().__init__()
        self.base, self.anchors, self._open = base, [], None

    def handle_starttag(self, tag, attrs):
        if tag == "base":
            self.base = urllib.parse.urljoin(self.base, dict(attrs).get("href") or "")
        elif tag == "a":
            self._open = (dict(attrs), [])

    def handle_data(self, data):
        if self._open:
            self._open[1].append(data)

    def handle_endtag(self, tag):
        if tag == "a" and self._open:
            attrs, text = self._open
            self._open = None
            if attrs.get("href"):
                attrs["href"] = urllib.parse.urljoin(self.base, attrs["href"])
                self.anchors.append((attrs, "".join(text)))


def _fetch_page(index: str, key: str, timeout: float) -> tuple[list, int]:
    """The anchors of `index`'s page for project `key` (none when it has no such project), and the bytes read."""
    url = f"{index.rstrip('/')}/{key}/"
    headers = {"Accept": "text/html", "User-Agent": "posebooth-check-locks"}
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 (http(s) index URLs only)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            body = response.read()
            base = response.geturl()
    except urllib.error.HTTPError as e:
        if e.code in (403, 404):  # an index without that project
            return [], 0
        raise
    parser = _Anchors(base)
    parser.feed(body.decode("utf-8", "replace"))
    return parser.anchors, len(body)


@dataclass
class Snapshot:
    """Local simple indexes for pip, one per set of indexes that a lock reads (PyPI alone; PyPI and an extra one)."""

    pinned: dict  # (extra index, ...) -> file:// URL of an index with each project's pinned versions only
    full: dict  # (extra index, ...) -> the same with every version, for pip's "from versions: ..." on a failure
    unreachable: set  # extra indexes that could not be read
    bytes: int


def _version_of(filename: str) -> Version | None:
    try:
        if filename.endswith(".whl"):
            return parse_wheel_filename(filename)[1]
        return parse_sdist_filename(filename)[1]
    except (ValueError, InvalidVersion):
        return None


def _keep(anchor: tuple, versions: set) -> bool:
    """Whether a link is of a pinned version (== semantics: a pin without a local label takes local builds too)."""
    filename = urllib.parse.unquote(urllib.parse.urlparse(anchor[0]["href"]).path.rsplit("/", 1)[-1])
    version = _version_of(filename)
    return version is not None and (version in versions or Version(version.public) in versions)


def _write_index(folder: Path, pages: dict[str, list]) -> str:
    for key, anchors in pages.items():
        (folder / key).mkdir(parents=True)
        links = "\n".join(
            "<a {}>{}</a>".format(
                " ".join(f'{k}="{html.escape(v or "")}"' for k, v in attrs.items()), html.escape(text)
            )
            for attrs, text in anchors
        )
        (folder / key / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}\n</body></html>\n")
    return folder.as_uri() + "/"


def snapshot(folder: Path, locks: list[Lock], main_index: str, jobs: int) -> Snapshot:
    """Fetch each pinned project's page from the main index and from the extra indexes of the locks that pin it,
    once for all pip runs, and write a local index for each set of indexes that a lock reads."""
    unreachable: set = set()
    for index in sorted({index for lock in locks for index in lock.indexes}):
        try:  # once, shortly: a host that does not answer would hold every page's request for a minute
            urllib.request.urlopen(index, timeout=15).close()  # noqa: S310 (http(s) index URLs)
        except urllib.error.HTTPError:
            pass  # it answers
        except (urllib.error.URLError, OSError):
            unreachable.add(index)
    # What pip may need to build an sdist's metadata, every version.
    build = {"setuptools", "wheel"}
    work = sorted({(key, index) for key in build for index in [main_index]})
    work += sorted({(pin.key, index) for lock in locks for pin in lock.pins for index in [main_index, *lock.indexes]})
    work = [item for item in dict.fromkeys(work) if item[1] not in unreachable]

    def fetch(item):
        key, index = item
        try:
            return item, *_fetch_page(index, key, timeout=60)
        except (urllib.error.URLError, OSError) as e:
            raise SystemExit(f"check_locks: cannot read {index.rstrip('/')}/{key}/: {e}") from None

    pages: dict[tuple, list] = {}
    total = 0
    with concurrent.futures.ThreadPoolExecutor(max(4, jobs * 4)) as pool:
        for item, anchors, size in pool.map(fetch, work):
            pages[item] = anchors
            total += size
    snap = Snapshot({}, {}, unreachable, total)
    for n, extra in enumerate(sorted({tuple(lock.indexes) for lock in locks})):
        readers = [lock for lock in locks if tuple(lock.indexes) == extra]
        versions: dict[str, set] = {}
        for lock in readers:
            for pin in lock.pins:
                versions.setdefault(pin.key, set()).add(Version(pin.version))
        full = {
            key: [a for index in (main_index, *extra) for a in pages.get((key, index), [])]
            for key in sorted(set(versions) | build)
        }
        pinned = {key: [a for a in anchors if key in build or _keep(a, versions[key])] for key, anchors in full.items()}
        snap.pinned[extra] = _write_index(folder / f"index-{n}" / "pinned", pinned)
        snap.full[extra] = _write_index(folder / f"index-{n}" / "full", full)
    return snap


# ---------------------------------------------------------------------------------------------------- checking


@dataclass
class Result:
    platform: Platform
    python: str
    problems: list[str] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)
    wheels: int = 0
    sdists: list[str] = field(default_factory=list)
    pins: int = 0
    seconds: float = 0.0


def _pip(args: list[str], index: str, platform: Platform, python: str, work: Path) -> tuple[int, str, dict]:
    work.mkdir(parents=True)
    report = work / "report.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed"]
    cmd += ["--isolated", "--disable-pip-version-check", "--no-input", "--progress-bar", "off"]
    cmd += ["--target", str(work / "target"), "--report", str(report), "--index-url", index]
    cmd += ["--use-feature=fast-deps", "--only-binary=:all:", *(f"--no-binary={name}" for name in sorted(SDISTS))]
    cmd += ["--python-version", python, "--implementation", "cp"]
    cmd += [f"--platform={tag}" for tag in platform.tags]
    # No pip configuration (an index, find-links or constraints set up for this machine's own installs).
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    proc = subprocess.run([*cmd, *args], capture_output=True, text=True, env=env, check=False)
    data = json.loads(report.read_text()) if proc.returncode == 0 and report.exists() else {}
    return proc.returncode, proc.stdout + proc.stderr, data


def _errors(output: str) -> str:
    """pip's error lines on one line: the versions there are (the last ten), those that require another Python."""
    lines = []
    for line in output.splitlines():
        line = line.removeprefix("ERROR: ").strip()
        if line.startswith(("No matching distribution", "Ignored the following yanked")):
            continue
        if line.startswith(("Could not find a version", "Ignored the following versions")):
            line = re.sub(r"\(from versions: ([^)]*)\)", lambda m: _last(m.group(1)), line)
            lines.append(line)
    if lines:
        return "; ".join(lines)
    return output.strip().splitlines()[-1] if output.strip() else "pip failed"


def _last(versions: str, n: int = 10) -> str:
    items = [v.strip() for v in versions.split(",") if v.strip()]
    return f"(from versions: {'..., ' if len(items) > n else ''}{', '.join(items[-n:]) or 'none'})"


def check(platform: Platform, python: str, snap: Snapshot, work: Path, roots: list[Requirement]) -> Result:
    start = time.monotonic()
    result = Result(platform, python)
    env = environment(platform, python)
    lock = read_lock(ROOT / platform.lock)
    pins = select(lock, env)
    result.pins = len(pins)
    # What only an unreachable extra index serves: pins with a local version label (+cpu).
    offline = {key for key, pin in pins.items() if "+" in pin.version and set(lock.indexes) & snap.unreachable}
    for key in sorted(offline):
        result.unverified.append(
            f"{pins[key].name}=={pins[key].version} ({', '.join(sorted(snap.unreachable))} unreachable)"
        )
    wanted = [pin for key, pin in sorted(pins.items()) if key not in offline]
    reqs = work / "requirements.txt"
    work.mkdir(parents=True)
    reqs.write_text("".join(f"{pin.name}=={pin.version}\n" for pin in wanted))

    index, full_index = snap.pinned[tuple(lock.indexes)], snap.full[tuple(lock.indexes)]
    code, output, report = _pip(["-r", str(reqs)], index, platform, python, work / "all")
    # pip stops at the first pin that fails: leave it out and resolve the rest again, to name every one (past a
    # few, try each remaining pin alone instead), then ask pip about each with every version in the index.
    failing: list[Pin] = []
    while code != 0:
        found = re.search(r"No matching distribution found for ([A-Za-z0-9._-]+)", output)
        pin = next((p for p in wanted if found and p.key == canonicalize_name(found.group(1))), None)
        if pin is None or len(failing) >= 5:

            def alone(pin):
                return pin, _pip([f"{pin.name}=={pin.version}"], index, platform, python, work / f"pin-{pin.key}")[0]

            with concurrent.futures.ThreadPoolExecutor(4) as pool:
                alone_failing = [pin for pin, c in pool.map(alone, wanted) if c != 0]
            if not alone_failing:
                result.problems.append(f"pip failed: {_errors(output)}")
                break
            failing += alone_failing
        else:
            failing.append(pin)
        wanted = [p for p in wanted if p not in failing]
        (work / f"rest-{len(failing)}.txt").write_text("".join(f"{p.name}=={p.version}\n" for p in wanted))
        args = ["-r", str(work / f"rest-{len(failing)}.txt")]
        code, output, report = _pip(args, index, platform, python, work / f"rest-{len(failing)}")
    for pin in failing:
        c, out, _ = _pip([f"{pin.name}=={pin.version}"], full_index, platform, python, work / f"why-{pin.key}")
        why = _errors(out) if c else "it does from the full index page: scripts/check_locks.py dropped its files"
        result.problems.append(f"{pin.name}=={pin.version} does not resolve: {why}")
    if code != 0:
        result.seconds = time.monotonic() - start
        return result

    resolved = {}
    for item in report.get("install", []):
        meta = item["metadata"]
        resolved[canonicalize_name(meta["name"])] = meta
        url = item.get("download_info", {}).get("url", "")
        if url.endswith(".whl"):
            result.wheels += 1
        else:
            result.sdists.append(meta["name"])
    for pin in wanted:
        got = resolved.get(pin.key)
        if got is None or Version(got["version"]) != Version(pin.version):
            result.problems.append(f"{pin.name}=={pin.version}: pip would install {got and got['version']}")
    # Without the metadata of what an unreachable index serves, or of what failed, what needs which pin is unknown.
    result.problems += closure(pins, resolved, roots, env, unused=not offline and not failing)
    result.seconds = time.monotonic() - start
    return result


def closure(
    pins: dict[str, Pin], resolved: dict[str, dict], roots: list[Requirement], env: dict, unused: bool = True
) -> list[str]:
    """Every requirement that applies on the target, of posebooth (`roots`) and of every package they need in
    turn, is pinned at a version that satisfies it (extras followed), and every pin is needed by something."""
    problems: list[str] = []
    extras: dict[str, set] = {key: set() for key in pins}
    expanded: dict[str, set] = {}
    queue: list[tuple[str | None, Requirement]] = [(None, req) for req in roots]  # owner None: posebooth
    applied: set = set()

    def label(owner: str | None) -> str:
        return "posebooth (pyproject.toml)" if owner is None else f"{pins[owner].name}=={pins[owner].version}"

    def expand(key: str) -> None:
        expanded[key] = set(extras[key])
        queue.extend((key, Requirement(line)) for line in resolved.get(key, {}).get("requires_dist") or [])

    for key in sorted(set(ROOTS) & set(pins)):
        expand(key)
    while queue:
        owner, req = queue.pop()
        owner_extras = ["", *sorted(extras[owner])] if owner is not None else [""]
        if req.marker is not None and not any(req.marker.evaluate({**env, "extra": e}) for e in owner_extras):
            continue  # an owner's extra that is requested later queues its requirements again
        if (owner, str(req)) in applied:
            continue
        applied.add((owner, str(req)))
        key = canonicalize_name(req.name)
        if key not in pins:
            if (owner, key) not in UNPINNED_ON_PURPOSE:
                problems.append(f"{label(owner)} requires {req}, which the lock does not pin")
            continue
        if not req.specifier.contains(Version(pins[key].version), prereleases=True):
            problems.append(f"{label(owner)} requires {req}, but the lock pins {pins[key].name}=={pins[key].version}")
        extras[key] |= {canonicalize_name(e) for e in req.extras}
        if expanded.get(key) != extras[key]:
            expand(key)
    for key in sorted(set(pins) - set(expanded) if unused else ()):
        problems.append(f"{label(key)} is pinned, but nothing requires it on this target")
    return problems


# ------------------------------------------------------------------------------------------------------- main


def _received_bytes() -> int | None:
    """Bytes received on this machine's network interfaces (Linux), for the report."""
    try:
        lines = Path("/proc/net/dev").read_text().splitlines()[2:]
    except OSError:
        return None
    return sum(int(line.split(":", 1)[1].split()[0]) for line in lines if line.split(":", 1)[0].strip() != "lo")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--platform", action="append", choices=sorted(PLATFORMS), help="default: all")
    parser.add_argument("--python", action="append", choices=PYTHONS, help="default: all")
    parser.add_argument("--jobs", type=int, default=4, help="pip runs at once (default 4)")
    parser.add_argument("--index-url", help="the package index (default: pip's default index)")
    parser.add_argument("--strict", action="store_true", help="pins an unreachable extra index serves fail too")
    args = parser.parse_args(argv)

    import pip

    if Version(pip.__version__) < MIN_PIP:
        print(
            f"check_locks: pip {pip.__version__} is too old: before pip {MIN_PIP} a dry run downloads whole wheels "
            f"(gigabytes). Run it in the environment `make venv` creates (the locks pin pip), or upgrade pip.",
            file=sys.stderr,
        )
        return 2
    if args.index_url:
        if not args.index_url.startswith(("https://", "http://")):
            parser.error("--index-url: an http(s) URL")
        main_index = args.index_url
    else:
        from pip._internal.models.index import PyPI

        main_index = PyPI.simple_url
    platforms = [PLATFORMS[name] for name in (args.platform or PLATFORMS)]
    pythons = args.python or list(PYTHONS)
    roots = project_requirements()

    started, received = time.monotonic(), _received_bytes()
    try:
        locks = [read_lock(ROOT / platform.lock) for platform in platforms]
        for platform, lock in zip(platforms, locks, strict=True):
            for python in pythons:
                select(lock, environment(platform, python))  # a lock error stops everything, before any download
    except LockError as e:
        print(f"check_locks: {e}", file=sys.stderr)
        return 1

    with tempfile.TemporaryDirectory(prefix="check-locks-") as tmp:
        snap = snapshot(Path(tmp), locks, main_index, args.jobs)
        projects = len({pin.key for lock in locks for pin in lock.pins})
        print(f"index pages: {projects} projects, {snap.bytes / 1e6:.1f} MB, {time.monotonic() - started:.0f} s")
        for index in sorted(snap.unreachable):
            print(f"warning: {index} is unreachable: what only it serves is not verified")
        combos = [(p, py) for p in platforms for py in pythons]
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            futures = [
                pool.submit(check, p, py, snap, Path(tmp) / "work" / f"{p.name}-{py}", roots) for p, py in combos
            ]
            results = [f.result() for f in futures]

    failed = unverified = 0
    for r in results:
        label = f"{r.platform.name} / Python {r.python}"
        if r.problems:
            failed += 1
            print(f"FAIL {label}: {len(r.problems)} problem(s)")
            for problem in r.problems:
                print(f"     {label}: {problem}")
        else:
            sdists = f", sdists: {', '.join(r.sdists)}" if r.sdists else ""
            print(f"ok   {label}: {r.pins} pins resolve ({r.wheels} wheels{sdists}) in {r.seconds:.0f} s")
        for item in r.unverified:
            unverified += 1
            print(f"     {label}: NOT VERIFIED: {item}")
    took = time.monotonic() - started
    got = _received_bytes()
    network = f", {(got - received) / 1e6:.0f} MB received over the network" if got is not None and received else ""
    print(
        f"{len(results) - failed} of {len(results)} platform/Python combinations resolve "
        f"({failed} failed, {unverified} pins not verified) in {took:.0f} s{network}"
    )
    return 1 if failed or (args.strict and unverified) else 0


if __name__ == "__main__":
    sys.exit(main())
