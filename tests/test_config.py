"""TrainConfig: reading, validation errors that name the field, round trips, the option reference in docs/."""

import dataclasses
import json
import re
from pathlib import Path

import pytest

from comfyui_dreambooth_lora.trainer.config import (ConfigError, TrainConfig, load_config, option_table,
                                                     partial_lora_name, save_config)

REQUIRED = {"pretrained_model": "model.safetensors", "instance_dir": "data", "instance_prompt": "a photo of sks dog"}


def test_toml_sections_and_relative_paths(tmp_path):
    (tmp_path / "run.toml").write_text(
        'pretrained_model = "models/base.safetensors"\n'
        '[data]\ninstance_dir = "photos"\ninstance_prompt = "a photo of sks dog"\nresolution = 768\n'
        '[lora]\nrank = 8\nalpha = 4\n', encoding="utf-8")
    config = load_config(tmp_path / "run.toml")
    assert config.resolution == 768 and config.rank == 8 and config.alpha == 4.0
    assert Path(config.instance_dir) == tmp_path / "photos"
    assert Path(config.pretrained_model) == tmp_path / "models" / "base.safetensors"


def test_every_problem_is_listed_with_field_value_and_allowed(tmp_path):
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({**REQUIRED, "rank": 0, "optimizer": "sgd", "resolution": 500, "flip_p": 2.0})
    text = str(e.value)
    assert "rank: 0 is below the minimum 1" in text
    assert "optimizer: 'sgd' is not allowed; choose one of 'adamw', 'adamw8bit', 'prodigy'" in text
    assert "resolution: 500 must be a multiple of 8" in text
    assert "flip_p: 2.0 is above the maximum 1.0" in text
    assert len(e.value.problems) == 4


def test_unknown_key_suggests_the_close_one_and_types_are_checked():
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({**REQUIRED, "learning_rat": 1e-4, "max_train_steps": "many", "buckets": 1,
                               "cuda_graphs": True})
    text = str(e.value)
    assert "cuda_graphs: expected one of 'auto', 'yes', 'no' (a string), got True" in text
    assert "learning_rat: unknown option; did you mean 'learning_rate'?" in text
    assert "max_train_steps: expected an integer, got 'many'" in text
    assert "buckets: expected true or false, got 1" in text


@pytest.mark.parametrize("name", ["../evil", "/abs/path", "a/b", "a\\b", "..", "C:lora", "", "x" * 201, "my_dog.safetensors",
                                  partial_lora_name("dog", 2).removesuffix(".safetensors")])
def test_output_name_must_be_a_plain_file_name(name):
    with pytest.raises(ConfigError, match="output_name"):
        TrainConfig.from_dict({**REQUIRED, "output_name": name})


def test_prior_preservation_needs_class_prompt_and_folder():
    with pytest.raises(ConfigError) as e:
        TrainConfig.from_dict({**REQUIRED, "with_prior_preservation": True})
    assert "class_prompt: required with with_prior_preservation" in str(e.value)
    assert "class_dir: required with with_prior_preservation" in str(e.value)


@pytest.mark.parametrize("options, message", [
    ({"alpha": 0.0}, "alpha: 0.0 trains nothing"),
    ({"lora_dropout": 1.0}, "lora_dropout: 1.0 drops the whole LoRA path"),
    ({"adam_beta1": 1.0}, "adam_beta1: 1.0 must be below 1"),
    ({"adam_beta2": 1.0}, "adam_beta2: 1.0 must be below 1"),
    ({"sample_resolution": 100}, "sample_resolution: 100 must be a multiple of 8"),
    ({"caption_extension": "txt"}, "caption_extension: 'txt' must start with a dot, e.g. '.txt'"),
    ({"resolution": 256, "bucket_step": 512}, "bucket_step: 512 is above resolution 256"),
    ({"with_prior_preservation": True, "class_prompt": "a dog", "class_dir": "data"}, "class_dir: data is instance_dir"),
    ({"with_prior_preservation": True, "class_prompt": "a dog", "class_dir": "data/10_class"}, "an `N_name` subfolder"),
    ({"network": "foo"}, "network: 'foo' is not allowed; choose one of 'lora', 'loha', 'lokr'"),
    ({"network": "lokr", "lokr_factor": 0}, "lokr_factor: 0 splits nothing; use -1 (automatic"),
    ({"lokr_factor": -2}, "lokr_factor: -2 is below the minimum -1"),
    ({"network": "loha", "use_dora": True}, "use_dora: DoRA is a LoRA option; set use_dora = false for network 'loha'"),
    ({"network": "lokr", "lora_dropout": 0.1}, "lora_dropout: dropout on the LoRA path is a LoRA option"),
    ({"network": "lokr", "export_format": "both"}, "export_format: diffusers' layout holds LoRAs only; use 'kohya'"),
    ({"use_dora": True, "lora_targets": "all_linear_and_conv"}, "use_dora: DoRA is exported for linear layers only"),
])
def test_settings_that_would_train_nothing_or_fail_later_are_refused_up_front(options, message):
    # Each was accepted before and trained a LoRA that did nothing, or failed after the model had loaded.
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        TrainConfig.from_dict({**REQUIRED, **options})
    assert len(e.value.problems) == 1


def test_a_class_folder_in_a_plain_subfolder_of_the_instance_folder_is_fine():
    # The image scan reads only `N_name` subfolders, so nothing mixes (this layout was refused for a while).
    config = TrainConfig.from_dict({**REQUIRED, "with_prior_preservation": True, "class_prompt": "a dog",
                                    "class_dir": "data/class"})
    assert config.class_dir == "data/class"


def test_a_number_too_large_for_an_integer_option_is_a_config_error(tmp_path):
    (tmp_path / "run.toml").write_text('max_train_steps = inf\nrank = 1e400\n', encoding="utf-8")
    with pytest.raises(ConfigError) as e:  # was an OverflowError traceback
        load_config(tmp_path / "run.toml", REQUIRED)
    assert "max_train_steps: expected an integer, got inf" in str(e.value) and "rank: expected an integer" in str(e.value)


def test_resume_folder_is_relative_to_the_config_file(tmp_path):
    checkpoint = tmp_path / "runs" / "checkpoints" / "step_00000004"
    checkpoint.mkdir(parents=True)
    (tmp_path / "run.toml").write_text('resume_from_checkpoint = "runs/checkpoints/step_00000004"\n',
                                       encoding="utf-8")
    assert Path(load_config(tmp_path / "run.toml", REQUIRED).resume_from_checkpoint) == checkpoint
    (tmp_path / "resume.toml").write_text('resume = true\n', encoding="utf-8")
    assert load_config(tmp_path / "resume.toml", REQUIRED).resume is True
    (tmp_path / "missing.toml").write_text('resume_from_checkpoint = "runs/checkpoints/step_00000009"\n',
                                           encoding="utf-8")
    with pytest.raises(ConfigError, match="step_00000009.* is not an existing folder; name an output_dir/checkpoints"):
        load_config(tmp_path / "missing.toml", REQUIRED)


def test_home_is_expanded_and_command_line_paths_are_relative_to_where_it_ran(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "run.toml").write_text('pretrained_model = "~/models/base.safetensors"\n'
                                                'instance_dir = "photos"\n', encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    config = load_config(tmp_path / "conf" / "run.toml", {"instance_prompt": "p", "class_dir": "typed/class"})
    assert Path(config.pretrained_model) == tmp_path / "home" / "models" / "base.safetensors"
    assert Path(config.instance_dir) == tmp_path / "conf" / "photos"  # in the file: relative to the file
    assert Path(config.class_dir) == tmp_path / "typed" / "class"  # --set: relative to the current folder


def test_a_windows_path_in_double_quotes_gets_a_hint(tmp_path):
    (tmp_path / "run.toml").write_text('pretrained_model = "C:\\Users\\me\\sd15.safetensors"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="single quotes"):
        load_config(tmp_path / "run.toml")


def test_a_table_that_is_not_a_section_is_named(tmp_path):
    (tmp_path / "run.toml").write_text('[training]\nmax_train_steps = 10\n[optimizer]\nlearning_rate = 1e-4\n',
                                       encoding="utf-8")
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "run.toml", REQUIRED)
    assert "[training]: not a section; the sections are [model], [data]" in str(e.value)
    assert "optimizer: expected one of 'adamw', 'adamw8bit', 'prodigy' (a string), got a table ([optimizer] is an " \
           "option, not one of the sections [model]" in str(e.value)


def test_json_round_trip(tmp_path):
    config = TrainConfig.from_dict({**REQUIRED, "validation_prompts": ["a", "b"], "snr_gamma": 5})
    save_config(config, tmp_path / "run.json")
    assert load_config(tmp_path / "run.json") == dataclasses.replace(
        config, pretrained_model=str(tmp_path / "model.safetensors"), instance_dir=str(tmp_path / "data"),
        output_dir=str(tmp_path / "output"))
    assert json.loads((tmp_path / "run.json").read_text())["snr_gamma"] == 5.0


def test_bad_file_is_named(tmp_path):
    (tmp_path / "run.toml").write_text("rank = = 3", encoding="utf-8")
    with pytest.raises(ConfigError, match="run.toml: not valid TOML"):
        load_config(tmp_path / "run.toml")
    with pytest.raises(ConfigError, match="missing.toml: cannot read"):
        load_config(tmp_path / "missing.toml")


def test_caching_only_when_nothing_changes_the_inputs():
    base = TrainConfig(**REQUIRED)
    assert base.use_cached_latents
    assert not dataclasses.replace(base, flip_p=0.5).use_cached_latents
    assert not dataclasses.replace(base, train_text_encoder=True).use_cached_latents
    assert not dataclasses.replace(base, crop="random").use_cached_latents
    assert dataclasses.replace(base, flip_p=0.5, cache_latents="yes").use_cached_latents


def test_options_doc_is_the_current_option_table():
    """docs/options.md holds the table `options` prints today: every option, default and help text."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "options.md").read_text(encoding="utf-8")
    missing = [f.name for f in dataclasses.fields(TrainConfig) if f"`{f.name}`" not in doc]
    assert not missing, f"docs/options.md lacks options: {missing}"
    assert option_table() in doc, ("docs/options.md is out of date: replace its table with the output of "
                                   "`python -m comfyui_dreambooth_lora.trainer options`")
