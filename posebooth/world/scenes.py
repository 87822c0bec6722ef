"""Scenes of the procedural world: who is in the picture (a robot, a dog or a vase with its attributes),
in which pose, where (context and placement), and from which seed; rendered to an image with its
keypoints in posebooth's sidecar format, and described by a caption.

Every random choice comes from an explicit ``numpy.random.Generator`` or from ``Scene.seed``, so a scene
renders to the same bytes on every call. The held-out instance ``SUBJECT`` (the project's sample subject)
is never drawn by ``sample_scene`` unless asked for, so a model pretrained on the world meets it first
in the few-shot stage.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from posebooth.poses import OPENPOSE_18, Pose, Skeleton, parse_pose
from posebooth.world import dog, robot, vase
from posebooth.world.backgrounds import CONTEXTS, ground_mark
from posebooth.world.drawing import PALETTE, SS, rotate

CLASSES = ("robot", "dog", "vase")
COLOURS = tuple(PALETTE)
# Per class: the allowed shapes, markings and builds (see ``Instance``).
ATTRIBUTES: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "robot": (robot.HEADS, robot.EMBLEMS, robot.BUILDS),
    "dog": (dog.EARS, dog.PATTERNS, dog.BUILDS),
    "vase": (vase.SHAPES, vase.PATTERNS, ("normal",)),
}
POSES: dict[str, tuple[str, ...]] = {"robot": robot.POSES, "dog": dog.POSES, "vase": ("upright",)}
SKELETONS: dict[str, Skeleton | None] = {"robot": OPENPOSE_18, "dog": dog.DOG_SKELETON, "vase": None}


@dataclass(frozen=True)
class Instance:
    """One subject's identity: its class and the attributes that tell it apart from others of its class."""

    kind: str  # "robot", "dog" or "vase"
    colour: str  # a PALETTE name
    shape: str  # robot head (round, square, triangle), dog ears, vase shape
    marking: str  # robot chest emblem, dog or vase pattern
    build: str  # proportions: robot normal/tall/stocky, dog normal/long/tall, vase normal

    def __post_init__(self) -> None:
        if self.kind not in ATTRIBUTES:
            raise ValueError(f"unknown class {self.kind!r}; expected one of {CLASSES}")
        if self.colour not in PALETTE:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {COLOURS}")
        for field, value, allowed in zip(
            ("shape", "marking", "build"), (self.shape, self.marking, self.build), ATTRIBUTES[self.kind], strict=True
        ):
            if value not in allowed:
                raise ValueError(f"{self.kind} {field} {value!r} is not one of {allowed}")


@dataclass(frozen=True)
class Placement:
    """Where the subject stands in the frame, as fractions of the image side."""

    height: float  # the subject's height over the image's, about [0.45, 0.85]
    x: float  # its axis, from the left edge
    bottom: float  # its feet (paws, foot), from the top edge
    mirror: bool  # flipped left to right about the image's middle (keypoints' left and right swapped)
    tilt: float  # degrees, clockwise on screen, about the subject's middle


@dataclass(frozen=True)
class Scene:
    """Everything a render depends on: the same scene renders to the same bytes."""

    subject: Instance
    pose: str  # one of POSES[subject.kind]
    context: str  # one of CONTEXTS
    placement: Placement
    seed: int  # drives joint jitter, background variation and pixel noise


# The held-out instance: the sample subject of the project. No pretraining scene has all its attributes.
SUBJECT = Instance("robot", "orange", "triangle", "star", "tall")

# Height ranges per (class, build): tall figures are drawn bigger and stocky ones smaller, so that build
# words mean something; dogs are wider than tall and are kept smaller to fit the frame.
_HEIGHTS = {
    ("robot", "normal"): (0.45, 0.85),
    ("robot", "tall"): (0.58, 0.85),
    ("robot", "stocky"): (0.45, 0.72),
    ("dog", "normal"): (0.45, 0.66),
    ("dog", "long"): (0.42, 0.56),
    ("dog", "tall"): (0.5, 0.7),
    ("vase", "normal"): (0.45, 0.8),
}
_HALF_WIDTH = {"robot": 0.3, "dog": 0.66, "vase": 0.3}  # the subject's half-width over its height
_TILT = {"robot": 8.0, "dog": 4.0, "vase": 0.0}  # degrees either way
_FOOTPRINT = {"robot": 0.5, "dog": 1.1, "vase": 0.6}  # shadow width over the subject's height


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    """One of ``options``, uniformly."""
    return options[int(rng.integers(len(options)))]


def sample_instance(rng: np.random.Generator, kind: str) -> Instance:
    """A random instance of class ``kind``."""
    shapes, markings, builds = ATTRIBUTES[kind]
    return Instance(kind, _pick(rng, COLOURS), _pick(rng, shapes), _pick(rng, markings), _pick(rng, builds))


def sample_placement(rng: np.random.Generator, instance: Instance) -> Placement:
    """A random size, position, mirror and tilt for ``instance``, keeping most of it in the frame."""
    lo, hi = _HEIGHTS[(instance.kind, instance.build)]
    height = float(rng.uniform(lo, hi))
    slack = min(0.2, max(0.0, 0.5 - _HALF_WIDTH[instance.kind] * height - 0.02))
    x = float(rng.uniform(0.5 - slack, 0.5 + slack))
    bottom = float(rng.uniform(min(0.97, max(height + 0.03, 0.72)), 0.97))
    mirror = bool(rng.random() < 0.5)
    tilt = float(rng.uniform(-1, 1) * _TILT[instance.kind])
    return Placement(height, x, bottom, mirror, tilt)


def _check_names(values: Sequence[str] | None, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    """``values`` (all of ``allowed`` when None), or a ValueError naming the unknown ones and the choices."""
    values = tuple(allowed) if values is None else tuple(values)
    unknown = [v for v in values if v not in allowed]
    if unknown or not values:
        raise ValueError(f"unknown {what}: {unknown or 'none given'}; choose from {tuple(allowed)}")
    return values


def sample_scene(
    rng: np.random.Generator,
    classes: Sequence[str] = CLASSES,
    contexts: Sequence[str] | None = None,
    exclude: Sequence[Instance] = (SUBJECT,),
    instance: Instance | None = None,
) -> Scene:
    """A random scene: class (from ``classes``), attributes, pose, context (from ``contexts``, default all),
    placement and seed. Instances in ``exclude`` are redrawn; ``instance`` fixes the subject instead (the
    only way to get an excluded one)."""
    classes = _check_names(classes, CLASSES, "class(es)")
    contexts = _check_names(contexts, tuple(CONTEXTS), "context(s)")
    if instance is None:
        kind = _pick(rng, classes)
        instance = sample_instance(rng, kind)
        while instance in exclude:  # rejection keeps every other combination equally likely
            instance = sample_instance(rng, kind)
    pose, context = _pick(rng, POSES[instance.kind]), _pick(rng, contexts)
    placement = sample_placement(rng, instance)
    return Scene(instance, pose, context, placement, int(rng.integers(2**31 - 1)))


def iter_scenes(
    seed: int,
    n: int,
    classes: Sequence[str] = CLASSES,
    contexts: Sequence[str] | None = None,
    exclude: Sequence[Instance] = (SUBJECT,),
) -> Iterator[Scene]:
    """``n`` scenes from ``sample_scene``, the same stream for the same arguments (pretraining sets)."""
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield sample_scene(rng, classes, contexts, exclude)


def keypoints_xy(scene: Scene, size: int = 64) -> np.ndarray | None:
    """(K, 2) keypoints of ``scene`` in pixels of a ``size`` x ``size`` render, in the order of its
    skeleton, including those outside the image; None for a vase."""
    kind, pl = scene.subject.kind, scene.placement
    rng = np.random.default_rng([scene.seed, 1])  # its own stream: the pose does not shift the background
    if kind == "robot":
        fig = robot.robot_pose(scene.pose, scene.subject.build, rng)
    elif kind == "dog":
        fig = dog.dog_pose(scene.pose, scene.subject.build, rng)
    else:
        return None
    fig = rotate(fig, pl.tilt, np.array([0.0, 0.55]))  # about the middle of the body
    h = pl.height * size
    xy = np.stack([pl.x * size + fig[:, 0] * h, pl.bottom * size - (1 - fig[:, 1]) * h], axis=1)
    if pl.mirror:  # about the image's middle, as posebooth.poses.mirror_pose does
        xy[:, 0] = size - xy[:, 0]
        xy = xy[SKELETONS[kind].mirror_order()]
    return xy


def scene_pose(scene: Scene, size: int = 64) -> Pose | None:
    """The scene's keypoints as a ``Pose`` on the ``size`` x ``size`` render (confidence 1 inside the
    image, 0 outside); None for a vase."""
    xy = keypoints_xy(scene, size)
    if xy is None:
        return None
    inside = (xy[:, 0] >= 0) & (xy[:, 0] <= size) & (xy[:, 1] >= 0) & (xy[:, 1] <= size)
    kp = np.where(inside[:, None], np.concatenate([xy, np.ones((len(xy), 1))], axis=1), 0.0)
    return Pose(size, size, kp, SKELETONS[scene.subject.kind])


def _backdrop(scene: Scene, size: int) -> Image.Image:
    """The supersampled background of ``scene`` with the subject's shadow (or ripples), no subject."""
    S, pl = size * SS, scene.placement
    rng = np.random.default_rng([scene.seed, 2])
    hz = int(np.clip(min(rng.uniform(0.36, 0.62), pl.bottom - 0.1), 0.2, 0.8) * S)
    context = CONTEXTS[scene.context]
    canvas = context.draw(rng, S, hz)
    x = (1 - pl.x if pl.mirror else pl.x) * S
    ground_mark(
        ImageDraw.Draw(canvas, "RGBA"), context, (x, pl.bottom * S), _FOOTPRINT[scene.subject.kind] * pl.height * S
    )
    return canvas


def _finish(canvas: Image.Image, scene: Scene, size: int) -> Image.Image:
    """Downsample the canvas (LANCZOS, as scripts/make_sample_subject.py) and add seeded pixel noise of a
    few levels, so that no two renders of a background share their pixels."""
    small = np.asarray(canvas.resize((size, size), Image.Resampling.LANCZOS), dtype=np.int16)
    noise = np.random.default_rng([scene.seed, 3]).integers(-3, 4, small.shape, dtype=np.int16)
    return Image.fromarray(np.clip(small + noise, 0, 255).astype(np.uint8))


def background(scene: Scene, size: int = 64) -> Image.Image:
    """``scene`` rendered without its subject: identical to ``render`` wherever the subject is not."""
    return _finish(_backdrop(scene, size), scene, size)


def render(scene: Scene, size: int = 64) -> tuple[Image.Image, dict | None]:
    """The ``size`` x ``size`` RGB image of ``scene`` and its keypoint document (posebooth's sidecar
    format: openpose-18 for a robot, custom for a dog; None for a vase), validated by ``parse_pose``."""
    canvas = _backdrop(scene, size)
    d = ImageDraw.Draw(canvas)
    s, pl = scene.subject, scene.placement
    unit = pl.height * size * SS  # the subject's height in canvas pixels
    xy = keypoints_xy(scene, size)
    if s.kind == "robot":
        robot.draw_robot(d, xy * SS, s.colour, s.shape, s.marking, s.build, unit)
    elif s.kind == "dog":
        dog.draw_dog(d, xy * SS, s.colour, s.shape, s.marking, s.build, unit)
    else:
        x = (1 - pl.x if pl.mirror else pl.x) * size * SS
        vase.draw_vase(d, (x, (pl.bottom - pl.height) * size * SS), s.colour, s.shape, s.marking, unit)
    image = _finish(canvas, scene, size)
    pose = scene_pose(scene, size)
    if pose is None:
        return image, None
    doc = pose.to_json()
    parse_pose(doc, f"world scene (seed {scene.seed})")  # what we hand out must be posebooth's format
    return image, doc


# Caption words. Each attribute is kept with its probability in KEEP (colour and place most often), and
# CLASS_ONLY of captions name the class alone, so the model also learns "a photo of a robot".
KEEP = {"colour": 0.85, "context": 0.85, "shape": 0.4, "marking": 0.4, "build": 0.3}
CLASS_ONLY = 0.1
TEMPLATES = ("a photo of {}", "a photo of {}", "{}", "a picture of {}", "a rendering of {}")
_BUILD_WORDS = {"tall": "tall", "stocky": "short", "long": "long"}
_SHAPE_WORDS = {
    "robot": {"round": "round-headed", "square": "square-headed", "triangle": "triangle-headed"},
    "dog": {"pointed": "with pointed ears", "round": "with round ears", "floppy": "with floppy ears"},
    "vase": {"round": "round", "tall": "tall", "square": "square"},
}
_MARKING_WORDS = {
    "robot": {"star": "with a star", "circle": "with a circle", "stripe": "with a stripe"},
    "dog": {"spots": "spotted", "stripes": "striped"},
    "vase": {"stripes": "with stripes", "dots": "with dots", "zigzag": "with a zigzag"},
}


def caption(
    scene: Scene, rng: np.random.Generator, keep: dict[str, float] = KEEP, class_only: float = CLASS_ONLY
) -> str:
    """One caption of ``scene`` from the templates, e.g. "a photo of a red robot on the beach"; which
    words it keeps depends on ``rng`` (pass ``keep`` of all 1.0 and ``class_only=0`` for every word)."""
    if set(keep) != set(KEEP):
        raise ValueError(f"caption keep needs a probability for each of {sorted(KEEP)}, got {sorted(keep)}")
    s = scene.subject
    template = _pick(rng, TEMPLATES)
    if rng.random() < class_only:
        return template.format(f"a {s.kind}")
    use = {key: rng.random() < p for key, p in keep.items()}
    before, after = [], []  # words before the noun (in English adjective order) and phrases after it
    words = {
        "build": _BUILD_WORDS.get(s.build, ""),
        "colour": s.colour,
        "shape": _SHAPE_WORDS[s.kind][s.shape],
        "marking": _MARKING_WORDS[s.kind].get(s.marking, ""),
    }
    order = ("shape", "colour", "marking") if s.kind == "vase" else ("build", "colour", "shape", "marking")
    for key in order:
        word = words[key]
        if word and use[key]:
            (after if word.startswith("with ") else before).append(word)
    phrase = CONTEXTS[scene.context].phrase
    if phrase and use["context"]:
        after.append(phrase)
    noun = " ".join([*before, s.kind])
    article = "an" if noun[0] in "aeiou" else "a"
    return template.format(" ".join([article, noun, *after]))


def subject_photos(
    seed: int, n: int, size: int = 64, instance: Instance = SUBJECT, contexts: Sequence[str] | None = None
) -> list[tuple[Scene, Image.Image, dict | None]]:
    """``n`` renders of ``instance`` (default the held-out ``SUBJECT``), cycling through its poses and the
    contexts in a seeded order so that few photos repeat either: (scene, image, keypoints) each."""
    rng = np.random.default_rng(seed)
    contexts = _check_names(contexts, tuple(CONTEXTS), "context(s)")
    poses = [POSES[instance.kind][i] for i in rng.permutation(len(POSES[instance.kind]))]
    places = [contexts[i] for i in rng.permutation(len(contexts))]
    out = []
    for i in range(n):
        placement = sample_placement(rng, instance)
        scene = Scene(instance, poses[i % len(poses)], places[i % len(places)], placement, int(rng.integers(2**31 - 1)))
        out.append((scene, *render(scene, size)))
    return out
