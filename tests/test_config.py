"""Strict params loading: every error names the key and what is allowed."""

from __future__ import annotations

import copy

import pytest
import yaml

from posebooth import config
from posebooth.config import ConfigError
from tests.conftest import ROOT


@pytest.fixture()
def params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def _load(tmp_path, data, sections=tuple(config.SECTIONS)):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    return config.load(sections, path)


def test_repository_params_load(tmp_path, params):
    cfg = config.load(config.SECTIONS, ROOT / "params.yaml")
    assert cfg.train.steps >= 1 and cfg.common.identifier == "sks"
    assert isinstance(cfg.train.lr, float)


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("train", "stepz", 10, r"train.stepz: unknown key; allowed keys are \[.*'steps'"),
        ("train", "steps", "ten", r"train.steps: expected int, got str 'ten'"),
        ("train", "steps", 0, r"train.steps: 0 is out of range; it must be >= 1"),
        ("train", "steps", -5, r"train.steps: -5 is out of range"),
        ("train", "lr", 0.0, r"train.lr: 0.0 is out of range; it must be > 0"),
        ("train", "rank", 0, r"train.rank: 0 is out of range"),
        ("train", "steps", True, r"train.steps: expected int, got bool"),
        ("train", "target_modules", "to_q", r"train.target_modules: expected a list of str"),
        ("sample", "scheduler", "magic", r"sample.scheduler: 'magic' is not allowed; choose one of \['ddim'"),
        ("common", "device", "tpu", r"common.device: 'tpu' is not allowed"),
        ("train_pose", "empty_prompt_prob", 1.5, r"train_pose.empty_prompt_prob: 1.5 is out of range; it must be <= 1"),
        ("extract_poses", "detector", "magic", r"extract_poses.detector: 'magic' is not allowed"),
        ("train", "method", "hypernetwork", r"train.method: 'hypernetwork' is not allowed; choose one of \['lora'"),
        ("train", "lr_scheduler", "magic", r"train.lr_scheduler: 'magic' is not allowed"),
        ("train", "optimizer", "sgd", r"train.optimizer: 'sgd' is not allowed"),
        ("train_pose", "rank", -4, r"train_pose.rank: -4 is out of range; it must be >= 1"),
        ("train_pose", "steps", 0, r"train_pose.steps: 0 is out of range"),
        ("train_pose", "lr", -0.1, r"train_pose.lr: -0.1 is out of range; it must be > 0"),
        ("train_pose", "ema_decay", 1.0, r"train_pose.ema_decay: 1.0 would never move the average; use 0 \(off\)"),
        ("train", "ema_decay", -0.1, r"train.ema_decay: -0.1 is out of range; it must be >= 0"),
        ("generate_class_priors", "scheduler", "magic", r"generate_class_priors.scheduler: 'magic' is not allowed"),
        ("common", "deterministic", "yes", r"common.deterministic: expected bool, got str 'yes'"),
    ],
)
def test_bad_values_name_the_key(tmp_path, params, section, key, value, message):
    bad = copy.deepcopy(params)
    bad[section][key] = value
    with pytest.raises(ConfigError, match=message):
        _load(tmp_path, bad)


def test_missing_key_and_section(tmp_path, params):
    bad = copy.deepcopy(params)
    del bad["train"]["lr"]
    with pytest.raises(ConfigError, match=r"train.lr: missing"):
        _load(tmp_path, bad)
    del bad["train"]
    with pytest.raises(ConfigError, match=r"section 'train' is missing"):
        _load(tmp_path, bad, ["train"])


def test_only_requested_sections_are_loaded(tmp_path, params):
    bad = copy.deepcopy(params)
    bad["sample"]["steps"] = -1  # another stage's problem
    cfg = _load(tmp_path, bad, ["common", "train"])
    assert cfg.sample is None and cfg.train is not None


def test_scientific_notation_is_a_float(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("train:\n  lr: 1e-4\n  other: 5e-6\n")
    assert config.read_yaml(path)["train"] == {"lr": 1e-4, "other": 5e-6}


def test_ints_are_accepted_as_floats(tmp_path, params):
    params["train"]["alpha"] = 8
    assert _load(tmp_path, params).train.alpha == 8.0


def test_cross_field_checks(tmp_path, params):
    bad = copy.deepcopy(params)
    bad["train"]["prior_loss_weight"] = 1.0
    bad["generate_class_priors"]["num_class_images"] = 0
    with pytest.raises(ConfigError, match=r"train.prior_loss_weight > 0 needs class images"):
        _load(tmp_path, bad)
    bad = copy.deepcopy(params)
    bad["common"]["instance_prompt"] = "a photo of a {class_noun}"
    with pytest.raises(ConfigError, match=r"common.instance_prompt: must contain '\{identifier\}'"):
        _load(tmp_path, bad)
    bad = copy.deepcopy(params)
    bad["common"]["class_prompt"] = "a photo of {identifier}"
    with pytest.raises(ConfigError, match=r"common.class_prompt: must not contain"):
        _load(tmp_path, bad)
    bad = copy.deepcopy(params)
    bad["sample"]["prompts"] = ["a {subject} on the moon"]
    with pytest.raises(ConfigError, match=r"sample.prompts\[0\]"):
        _load(tmp_path, bad)


def test_config_is_frozen(params, tmp_path):
    cfg = _load(tmp_path, params)
    with pytest.raises(AttributeError):
        cfg.train.steps = 3  # type: ignore[misc]


def test_fill(tmp_path, params):
    c = _load(tmp_path, params).common
    assert config.fill(c.instance_prompt, c) == "a photo of sks robot"
    assert config.fill(c.class_prompt, c) == "a photo of a robot"


def test_fp16_on_cpu_is_an_error(tmp_path, params):
    params["common"]["precision"] = "fp16"
    with pytest.raises(ConfigError, match=r"common.precision: fp16 is not supported on cpu"):
        _load(tmp_path, params)
    params["common"]["device"] = "cuda"
    assert _load(tmp_path, params).common.precision == "fp16"
    params["common"]["device"], params["common"]["precision"] = "cpu", "bf16"
    assert _load(tmp_path, params).common.precision == "bf16"


def test_cpu_offload_needs_cuda_and_pad_color_is_rgb(tmp_path, params):
    bad = copy.deepcopy(params)
    bad["sample"]["cpu_offload"] = True
    with pytest.raises(ConfigError, match=r"sample.cpu_offload: needs common.device: cuda"):
        _load(tmp_path, bad)
    bad = copy.deepcopy(params)
    bad["prepare_images"]["pad_color"] = [0, 300, 0]
    with pytest.raises(ConfigError, match=r"prepare_images.pad_color: \[0, 300, 0\] must be three integers"):
        _load(tmp_path, bad)


def test_use_profile_sd15_is_one_command_and_stays_strict(tmp_path, capsys):
    from posebooth.cli import main

    target = tmp_path / "params.yaml"
    target.write_text((ROOT / "params.yaml").read_text())
    main(["--params", str(target), "use-profile", "sd15"])
    cfg = config.load(config.SECTIONS, target)
    profile = yaml.safe_load((ROOT / "profiles" / "sd15.yaml").read_text())
    for section, values in profile.items():
        for key, value in values.items():
            assert getattr(getattr(cfg, section), key) == value, f"{section}.{key}"
    assert cfg.common.model == "stable-diffusion-v1-5/stable-diffusion-v1-5" and cfg.common.resolution == 512
    assert cfg.train_pose.controlnet == "lllyasviel/control_v11p_sd15_openpose"
    assert "# posebooth: every hyperparameter lives here" in target.read_text()  # comments kept
    assert "applied" in capsys.readouterr().out


def test_use_profile_rejects_unknown_keys(tmp_path):
    from posebooth.cli import main

    target = tmp_path / "params.yaml"
    target.write_text((ROOT / "params.yaml").read_text())
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    with pytest.raises(SystemExit):
        main(["--params", str(target), "use-profile", str(bad)])
    assert target.read_text() == (ROOT / "params.yaml").read_text()  # untouched


# Keys a profile may set that are the user's own choices, not a model's or a GPU's: use-profile applies them
# but a later use-profile keeps them (profiles/defaults.yaml does not list them).
USER_KEYS = {("sample", "prompts"), ("sample", "pose_prompts"), ("sample", "poses"), ("sample", "seeds")}


def _use(target, *profiles: str) -> str:
    from posebooth.cli import main

    main(["--params", str(target), "use-profile", *profiles])
    return target.read_text()


def test_use_profile_sdxl_then_sd15_is_a_fresh_sd15_and_keeps_the_users_choices(tmp_path):
    """Profiles apply to the defaults, not to each other: sdxl then sd15 writes the file a fresh sd15 writes, so
    no SDXL-only knob (8-bit Adam, accumulation 2, the ControlNet LoRA of rank 32, xinsir's ControlNet) is
    left; the user's subject and a content profile applied before (live_subject's prompts) stay."""
    committed = (ROOT / "params.yaml").read_text()
    mine = committed.replace("identifier: sks ", "identifier: ohwx").replace("class_noun: robot", "class_noun: dog  ")
    assert mine != committed
    for name in ("switched", "fresh"):
        (tmp_path / f"{name}.yaml").write_text(mine)
        _use(tmp_path / f"{name}.yaml", "live_subject")
    _use(tmp_path / "switched.yaml", "sdxl")
    assert config.load(["train"], tmp_path / "switched.yaml").train.optimizer == "adamw_8bit"
    assert _use(tmp_path / "switched.yaml", "sd15") == _use(tmp_path / "fresh.yaml", "sd15")
    cfg = config.load(config.SECTIONS, tmp_path / "switched.yaml")
    assert (cfg.train.optimizer, cfg.train.gradient_accumulation_steps, cfg.train.snr_gamma) == ("adamw", 1, 0.0)
    assert (cfg.train_pose.mode, cfg.train_pose.rank, cfg.train_pose.optimizer) == ("full", 8, "adamw")
    assert cfg.common.vae == "" and not cfg.train.gradient_checkpointing
    assert cfg.train_pose.controlnet == cfg.generate_class_priors.controlnet == "lllyasviel/control_v11p_sd15_openpose"
    live = yaml.safe_load((ROOT / "profiles" / "live_subject.yaml").read_text())["sample"]["prompts"]
    assert (cfg.common.identifier, cfg.common.class_noun, cfg.sample.prompts) == ("ohwx", "dog", live)
    assert _use(tmp_path / "switched.yaml", "defaults") == _use(tmp_path / "fresh.yaml", "live_subject")
    assert _use(tmp_path / "switched.yaml", "sd15", "sdxl") == _use(tmp_path / "fresh.yaml", "sdxl")


def test_the_defaults_are_the_committed_params_and_cover_every_profile(tmp_path):
    """profiles/defaults.yaml holds params.yaml's committed value of every key a profile sets (but the user's),
    so use-profile can undo any profile; on the committed params.yaml, `use-profile defaults` changes no byte."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    defaults = yaml.safe_load((ROOT / "profiles" / "defaults.yaml").read_text())
    for section, values in defaults.items():
        for key, value in values.items():
            assert params[section][key] == value, f"profiles/defaults.yaml: {section}.{key}"
    for path in sorted((ROOT / "profiles").glob("*.yaml")):
        for section, values in yaml.safe_load(path.read_text()).items():
            for key in values:
                assert key in defaults.get(section, {}) or (section, key) in USER_KEYS, (
                    f"{path.name} sets {section}.{key}: add its default to profiles/defaults.yaml"
                )
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    assert _use(tmp_path / "params.yaml", "defaults") == (ROOT / "params.yaml").read_text()


def test_default_evaluation_prompts_are_the_papers():
    """params.yaml carries DreamBench's 25 object prompts; profiles/live_subject.yaml its 25 live-subject ones."""
    import re

    import pytest
    import yaml

    from tests.conftest import ROOT, SHARED

    source = SHARED / "dreambench" / "prompts_and_classes.txt"
    if not source.exists():
        pytest.skip("../shared/dreambench is not beside the repository")
    text = source.read_text()
    objects, live = text.split("Live Subject Prompts")

    def templates(block):
        return [m.replace("{0}", "{identifier}").replace("{1}", "{class_noun}")
                for m in re.findall(r"'([^']*)'\.format\(unique_token, class_token\)", block)]  # fmt: skip

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert params["sample"]["prompts"] == templates(objects) and len(templates(objects)) == 25
    profile = yaml.safe_load((ROOT / "profiles" / "live_subject.yaml").read_text())
    assert profile["sample"]["prompts"] == templates(live) and len(templates(live)) == 25
