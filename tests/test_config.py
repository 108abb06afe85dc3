"""Training configuration: every field coerced to its annotated type, with errors naming field, file and type."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cryoflex.config import TrainConfig, load_config, load_run_config
from cryoflex.errors import CryoflexInputError

_INPUTS = "particles: p.star\nstructure: s.pdb\n"


def test_yaml_1_1_exponent_numbers_load_as_numbers(tmp_path: Path) -> None:
    """YAML 1.1 reads 3e-4 (no dot) as text: it must still be a learning rate, not a TypeError in validate."""
    path = tmp_path / "c.yaml"
    path.write_text(_INPUTS + "learning_rate: 3e-4\nlatent_kl_weight: 1e-3\nepochs: 1e1\nencoder_hidden: ['64', 32]\n")
    config = load_config(path)
    assert config.learning_rate == pytest.approx(3e-4) and isinstance(config.learning_rate, float)
    assert config.latent_kl_weight == pytest.approx(1e-3)
    assert config.epochs == 10 and isinstance(config.epochs, int)
    assert config.encoder_hidden == [64, 32]


@pytest.mark.parametrize(
    ("line", "field", "expected"),
    [
        ("epochs: 2.5", "epochs", "an integer"),
        ("learning_rate: fast", "learning_rate", "a number"),
        ("progress: 1", "progress", "true or false"),
        ("parts: A:3", "parts", "a list"),
        ("downsample: [64]", "downsample", "an integer or null"),
        ("box_centre_A: [1, two, 3]", "box_centre_A", "a number"),
        ("segments: true", "segments", "an integer"),
    ],
)
def test_wrong_types_name_the_field_the_file_and_the_type(tmp_path: Path, line: str, field: str, expected: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(_INPUTS + line + "\n")
    with pytest.raises(CryoflexInputError, match=expected) as caught:
        load_config(path)
    assert caught.value.field == field and caught.value.path == str(path)


def test_directly_built_config_is_checked_too() -> None:
    config = TrainConfig(particles="p.star", structure="s.pdb", learning_rate="3e-4")  # type: ignore[arg-type]
    config.validate()
    assert config.learning_rate == pytest.approx(3e-4)
    with pytest.raises(CryoflexInputError, match="sigma_A"):
        TrainConfig(particles="p.star", structure="s.pdb", sigma_A="wide").validate()  # type: ignore[arg-type]


def test_stack_and_duplicate_images_settings(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("particles: poses.pkl\nctf: ctf.pkl\nstack: particles.mrcs\nstructure: s.pdb\n")
    config = load_config(path, {"duplicate_images": "first"})
    assert config.stack == str(tmp_path / "particles.mrcs") and config.duplicate_images == "first"
    assert load_config(path).duplicate_images == "refuse"
    with pytest.raises(CryoflexInputError, match="refuse, first, distinct") as caught:
        load_config(path, {"duplicate_images": "merge"})
    assert caught.value.field == "duplicate_images"


def test_the_correlation_loss_takes_its_own_weights_unless_given(tmp_path: Path) -> None:
    inputs = {"particles": "p.star", "structure": "s.pdb"}
    gaussian = load_config(None, inputs)
    assert (gaussian.likelihood, gaussian.latent_kl_weight, gaussian.draws_per_image) == ("gaussian", 1.0, 8)
    original = load_config(None, {**inputs, "likelihood": "correlation"})
    assert (original.latent_kl_weight, original.continuity_weight, original.clash_weight) == (1e-3, 1e-2, 1e-2)
    assert original.draws_per_image == 1  # 1 - correlation is no likelihood: nothing to weigh draws by
    path = tmp_path / "c.yaml"
    path.write_text(_INPUTS + "likelihood: correlation\nlatent_kl_weight: 0.01\n")
    assert load_config(path).latent_kl_weight == 0.01


def test_a_run_saved_before_the_likelihood_setting_keeps_its_objective(tmp_path: Path) -> None:
    saved = load_config(None, {"particles": "p.star", "structure": "s.pdb", "likelihood": "correlation"}).to_dict()
    del saved["likelihood"], saved["importance_samples"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(saved))
    assert load_run_config(path).likelihood == "correlation"
    assert load_run_config(path).latent_kl_weight == 1e-3


def test_a_run_saved_before_schedules_validation_and_the_learned_width_resumes_as_it_trained(tmp_path: Path) -> None:
    """A config without lr_schedule, validation_fraction and learn_sigma: a constant rate on every particle at a
    fixed width, not today's defaults (which would hold out particles it trained on and learn a width it lacks)."""
    saved = load_config(None, {"particles": "p.star", "structure": "s.pdb"}).to_dict()
    del saved["lr_schedule"], saved["validation_fraction"], saved["learn_sigma"]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(saved))
    config = load_run_config(path)
    assert (config.lr_schedule, config.validation_fraction, config.learn_sigma) == ("constant", 0.0, False)


def test_invalid_loader_and_clash_settings_are_refused_before_training() -> None:
    for name, value in (("num_workers", -1), ("clash_cutoff_A", 0.0), ("clash_skin_A", -1.0)):
        with pytest.raises(CryoflexInputError, match=name):
            load_config(None, {"particles": "p.star", "structure": "s.pdb", name: value})


@pytest.mark.parametrize(
    ("name", "value"),
    [("learning_rate", float("inf")), ("segmentation_learning_rate", float("inf")), ("seed", -1), ("seed", 2**64)],
)
def test_an_infinite_rate_and_a_seed_torch_cannot_take_are_refused_before_training(name: str, value: float) -> None:
    """An infinite rate used to train until the loss was non-finite; a negative or huge seed ended in a traceback
    after config.yaml and the cache were written."""
    with pytest.raises(CryoflexInputError) as error:
        load_config(None, {"particles": "p.star", "structure": "s.pdb", name: value})
    assert error.value.field == name


def test_a_missing_input_is_called_missing() -> None:
    with pytest.raises(CryoflexInputError, match=r"(?s)not given.*give the particle file \(--particles\)") as error:
        load_config(None, {"structure": "s.pdb"})
    assert error.value.field == "particles"


def test_a_sleep_phase_without_several_draws_is_refused_not_ignored() -> None:
    inputs = {"particles": "p.star", "structure": "s.pdb", "sleep_phase": True}
    assert load_config(None, inputs).sleep_phase
    for other in ({"importance_samples": 1}, {"likelihood": "correlation"}):
        with pytest.raises(CryoflexInputError, match="importance_samples above 1") as caught:
            load_config(None, {**inputs, **other})
        assert caught.value.field == "sleep_phase"


def test_a_run_saved_before_the_encoder_settings_keeps_its_full_box_encoder_without_dropout(tmp_path: Path) -> None:
    saved = load_config(None, {"particles": "p.star", "structure": "s.pdb"}).to_dict()
    assert saved["encoder_downsample"] == 2 and saved["encoder_dropout"] == 0.5
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(saved))
    assert load_run_config(path).encoder_downsample == 2 and load_run_config(path).encoder_dropout == 0.5
    del saved["encoder_downsample"], saved["encoder_dropout"]
    path.write_text(yaml.safe_dump(saved))
    assert load_run_config(path).encoder_downsample == 1 and load_run_config(path).encoder_dropout == 0.0
    for invalid in (-0.1, 1.0):
        with pytest.raises(CryoflexInputError, match="encoder_dropout"):
            load_config(None, {"particles": "p.star", "structure": "s.pdb", "encoder_dropout": invalid})


@pytest.mark.parametrize(
    ("setting", "default", "earlier", "invalid"),
    [("density", "residue_centroid", "pseudo_atom", "atoms"), ("rendering", "band_limited", "point", "fourier"),
     ("noise_model", "shells", "white", "pink")],
)  # fmt: skip
def test_a_run_saved_before_a_density_or_rendering_setting_renders_as_the_original(
    tmp_path: Path, setting: str, default: str, earlier: str, invalid: str
) -> None:
    """Runs saved before `density` rendered at the pseudo-atoms; before `rendering`, sampled at the pixel centres;
    before `noise_model`, took the noise as white."""
    saved = load_config(None, {"particles": "p.star", "structure": "s.pdb"}).to_dict()
    assert saved[setting] == default
    path = tmp_path / "config.yaml"
    del saved[setting]
    path.write_text(yaml.safe_dump(saved))
    assert getattr(load_run_config(path), setting) == earlier
    with pytest.raises(CryoflexInputError, match=setting):
        load_config(None, {"particles": "p.star", "structure": "s.pdb", setting: invalid})


def test_a_run_saved_before_the_segmentation_setting_keeps_drawing_segmentations(tmp_path: Path) -> None:
    saved = load_config(None, {"particles": "p.star", "structure": "s.pdb", "sample_segmentation": False}).to_dict()
    assert saved["sample_segmentation"] is False
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(saved))
    assert load_run_config(path).sample_segmentation is False
    del saved["sample_segmentation"]
    path.write_text(yaml.safe_dump(saved))
    assert load_run_config(path).sample_segmentation is True


def test_negative_weights_and_empty_layers_are_refused() -> None:
    inputs = {"particles": "p.star", "structure": "s.pdb"}
    for name, value in (("clash_weight", -1.0), ("latent_kl_weight", -1.0), ("latent_kl_warmup_epochs", -1.0),
                        ("translation_scale_A", 0.0), ("decoder_hidden", [0]), ("encoder_hidden", [8, 0])):  # fmt: skip
        with pytest.raises(CryoflexInputError) as refused:
            load_config(None, {**inputs, name: value})
        assert refused.value.field == name
    assert load_config(None, {**inputs, "clash_weight": 0.0}).clash_weight == 0.0


def test_input_paths_are_stored_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative path in a YAML file means the file next to it; one on the command line, the working directory's."""
    folder = tmp_path / "settings"
    folder.mkdir()
    (folder / "c.yaml").write_text("particles: ../data/particles.star\nconsensus_map: map.mrc\n")
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("settings/c.yaml"), {"structure": "nominal.pdb"})
    assert config.particles == str(tmp_path / "data" / "particles.star")
    assert config.consensus_map == str(folder / "map.mrc")
    assert config.structure == str(tmp_path / "nominal.pdb")
    assert load_config(None, {"particles": "/abs/p.star", "structure": "s.pdb"}).particles == "/abs/p.star"


@pytest.mark.parametrize("centre", [[1.0, 2.0, float("nan")], [0.0, float("inf"), 0.0], [1.0, 2.0]])
def test_box_centre_must_be_three_finite_numbers(centre: list[float]) -> None:
    with pytest.raises(CryoflexInputError, match="three finite numbers") as error:
        load_config(None, {"particles": "p.star", "structure": "s.pdb", "box_centre_A": centre})
    assert error.value.field == "box_centre_A"


def test_a_missing_configuration_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(CryoflexInputError, match="no such configuration file"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(CryoflexInputError, match="no such configuration file"):
        load_config(tmp_path)
