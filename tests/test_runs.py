"""The protocols' pieces, in this process: `moco_keras.runs` (a config's
checks, the resume contract), `pretraining` and `linear_classification`
(their checks, model, backbone handling). The runs themselves run in fresh
processes in tests/test_recipes.py (the recipes are their command lines)."""

import os

import keras
import numpy as np
import pytest
from support import recipe_defaults

from moco_keras import configs
from moco_keras import evaluation
from moco_keras import linear_classification
from moco_keras import methods
from moco_keras import presets
from moco_keras import pretraining
from moco_keras import runs
from moco_keras import sources
from moco_keras.recipes import common


def defaults(preset="mocov1", **flags):
    return recipe_defaults(presets.PRETRAINING, preset, **flags)


def lincls_defaults(**flags):
    return recipe_defaults(presets.LINEAR_CLASSIFICATION, "imagenet", **flags)


def test_config_is_the_preset_with_overrides_and_refuses_unknown_keys():
    preset = presets.PRETRAINING["mocov2"]
    config = configs.config(
        preset, run={"workdir": "w"}, model={"queue_size": 64}
    )
    assert config["model"] == {**presets.MOCOV2, "queue_size": 64}
    assert config["run"]["workdir"] == "w" and config["run"]["seed"] == 0
    assert preset["model"]["queue_size"] == 65536  # the preset unchanged
    with pytest.raises(configs.ConfigError, match="Unknown keys .'queue'. in"):
        configs.config(preset, model={"queue": 64})
    with pytest.raises(configs.ConfigError, match="Unknown config section"):
        configs.config(preset, classifier={"pretrained": "w"})


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"moco_k": 1000}, "not divisible by the global --batch_size=256"),
        ({"bn_splits": 3}, "does not divide the global batch"),
        ({"cpu_devices": -1}, "--cpu_devices must be >= 0"),
        ({"schedule": ["120", "250"]}, r"milestones \[250\]"),
        ({"dataset": "cifar10"}, "Unknown --dataset='cifar10'"),
        ({"data_dir": None}, "--dataset=folder needs --data_dir"),
        ({"workdir": None}, "--workdir is required"),
        ({"lr": float("nan")}, "--lr must be a finite number"),
        ({"arch": "cifar_resnet18"}, "with small images"),
        ({"crop_min": 0.0}, "--crop_min is an area fraction"),
        ({"crop_min": 1.5}, "--crop_min is an area fraction"),
        ({"image_size": 0}, "--image_size=0 is the side of the crops"),
        # The MoCo arguments, checked by MoCo's own check before any data.
        ({"moco_t": 0.0}, r"model.temperature: `temperature` \(T\) must"),
        ({"moco_m": 1.5}, r"model.momentum: `momentum` \(m\) must be"),
        ({"moco_dim": 0}, r"model.dim: `dim` must be a positive int"),
        ({"image_size": -224}, "must be >= 8"),
    ],
)
def test_pretrain_flag_contradictions(overrides, message):
    with pytest.raises(configs.ConfigError, match=message):
        pretraining.check_pretraining(defaults(**overrides))


@pytest.mark.parametrize(
    "preset, overrides, message",
    [
        ("mocov3_r50", {"warmup_epochs": 100}, "--warmup_epochs=100 must be"),
        ("mocov3_r50", {"moco_mlp_dim": 0}, r"model.mlp_dim: `mlp_dim` must"),
        ("mocov3_r50", {"moco_t": 0.0}, r"model.temperature: `temperature`"),
        ("mocov3_vit_small", {"image_size": 40}, "must be a multiple of 16"),
        ("mocov3_vit_small", {"arch": "resnet50"}, "--stop_grad_conv1 freez"),
    ],
)
def test_mocov3_flag_contradictions(preset, overrides, message):
    with pytest.raises(configs.ConfigError, match=message):
        pretraining.check_pretraining(defaults(preset, **overrides))
    # The preset itself passes.
    pretraining.check_pretraining(defaults(preset))


@pytest.mark.parametrize(
    "preset, flag",
    [
        ("mocov3_r50", {"moco_k": 4096}),  # no queue in v3
        ("mocov3_r50", {"cos": True}),  # v3's warm-up and cosine always
        ("mocov3_r50", {"stop_grad_conv1": True}),  # a ViT's flag
        ("mocov3_vit_small", {"width": 64}),
        ("mocov2", {"moco_mlp_dim": 1024}),  # a v3 flag on v2
        ("mocov2", {"warmup_epochs": 5}),
    ],
)
def test_a_flag_the_preset_has_no_value_for_is_refused(preset, flag):
    (name,) = flag
    with pytest.raises(configs.ConfigError, match=f"--{name} has no effect"):
        defaults(preset, **flag)


def test_rerun_of_a_workdir_refuses_changed_values(tmp_path):
    """A workdir with a checkpoint resumes only with its own values; the
    ones of `RESUMABLE` (e.g. `epochs`) may change."""
    import json

    config = defaults(workdir=str(tmp_path), moco_k=256, width=16)
    configs.check_resume(config)  # a new workdir
    runs.write_json_atomically(str(tmp_path / "config.json"), config)
    changed = configs.config(config, model={"queue_size": 512})
    configs.check_resume(changed)  # no checkpoint yet
    os.makedirs(tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / "ckpt-000000004.keras").write_bytes(b"")
    configs.check_resume(json.loads(json.dumps(config)))
    configs.check_resume(
        configs.config(config, schedule={"epochs": 400}, run={"verbose": "2"})
    )
    with pytest.raises(configs.ConfigError) as error:
        configs.check_resume(
            configs.config(
                changed, encoder={"width": 64}, schedule={"epochs": 9}
            )
        )
    message = str(error.value)
    assert "model.queue_size: 256 in its config.json, 512 now" in message
    assert "encoder.width: 16 in its config.json, 64 now" in message
    assert "schedule.epochs:" not in message  # resumable
    assert "ckpt-000000004.keras" in message
    assert "a new run.workdir" in message
    for key in configs.RESUMABLE:
        assert key in message
    # The recipes print it in flag names.
    printed = common.in_flag_names(message)
    assert "--moco_k: 256 in its config.json, 512 now" in printed
    assert "a new --workdir" in printed and "--epochs" in printed
    # A config.json from before run.health existed: that run had it on.
    del config["run"]["health"]
    runs.write_json_atomically(str(tmp_path / "config.json"), config)
    for health in (True, False):
        config["run"]["health"] = health
        if health:
            configs.check_resume(config)
            continue
        with pytest.raises(
            configs.ConfigError, match="run.health: True in its"
        ):
            configs.check_resume(config)


def test_a_run_of_the_removed_view_options_resumes_only_unchanged(
    tmp_path,
):
    """A workdir of the removed tf.data pipeline with its colour half on the
    CPU: its checkpoint has no colour layer, so the views would go on
    uncoloured; refused. One whose colour ran in the model resumes, its
    stored `data.input` and `augmentation.color_in_model` ignored; one
    whose crops were resized without antialiasing is refused."""
    from support import make_moco

    from moco_keras import color
    from moco_keras import training

    config = defaults(workdir=str(tmp_path))
    stored = configs.config(config)
    stored["data"]["input"] = "tf_data"
    stored["augmentation"]["color_in_model"] = False
    runs.write_json_atomically(str(tmp_path / "config.json"), stored)
    checkpoint = str(tmp_path / "checkpoints" / "ckpt-000000004.keras")
    os.makedirs(tmp_path / "checkpoints")
    for augmentation in (None, color.ColorAugmentation(seed=0)):
        model = make_moco(augmentation=augmentation)
        model(np.zeros((2, 4, 4, 3), "float32"))
        training.save_atomically(model, checkpoint)
        if augmentation is not None:
            # A grain run: its colour ran in the model whatever the flag.
            configs.check_resume(config)
            continue
        with pytest.raises(configs.ConfigError) as error:
            configs.check_resume(config)
        assert "colour half on the CPU" in str(error.value)
        assert "ckpt-000000004.keras" in str(error.value)
    # Its colour in the model by the flag: resumes, the checkpoint unread.
    stored["augmentation"]["color_in_model"] = True
    runs.write_json_atomically(str(tmp_path / "config.json"), stored)
    (tmp_path / "checkpoints" / "ckpt-000000004.keras").write_bytes(b"")
    configs.check_resume(config)
    # Crops resized without antialiasing, an option the pipeline no longer
    # has: the views would change.
    stored["augmentation"]["antialias"] = False
    runs.write_json_atomically(str(tmp_path / "config.json"), stored)
    with pytest.raises(configs.ConfigError) as error:
        configs.check_resume(config)
    assert "augmentation.antialias: False in its config.json, removed now" in (
        str(error.value)
    )
    stored["augmentation"]["antialias"] = True
    runs.write_json_atomically(str(tmp_path / "config.json"), stored)
    configs.check_resume(config)


def test_strategy_of_another_backend_is_refused():
    backend = keras.backend.backend()
    other = "data_parallel" if backend == "tensorflow" else "mirrored"
    with pytest.raises(
        configs.ConfigError, match=f"this process runs {backend}"
    ):
        pretraining.check_pretraining(defaults(strategy=other))
    with pytest.raises(configs.ConfigError, match="Unknown strategy 'horovod'"):
        pretraining.check_pretraining(defaults(strategy="horovod"))


def test_a_negative_count_of_grain_workers_is_refused():
    sources.check_input(defaults(workers=2))
    with pytest.raises(configs.ConfigError, match="--workers is a count"):
        sources.check_input(defaults(workers=-1))


def test_batch_and_bn_groups_must_split_over_the_devices():
    config = defaults(batch_size=256, bn_splits=8)
    method = methods.get(config)
    for devices in (8, 4):
        configs.check_devices(config, devices)
        method.check_devices(config, devices)
    with pytest.raises(
        configs.ConfigError, match="does not split over 3 devices"
    ):
        configs.check_devices(config, 3)
    # The BN groups are the method's: v1/v2's split BN, none in v3.
    with pytest.raises(configs.ConfigError, match="must be a multiple of 16"):
        method.check_devices(config, 16)
    v3 = recipe_defaults(presets.PRETRAINING, "mocov3_r50", batch_size=256)
    methods.get(v3).check_devices(v3, 16)


def test_valid_flags_pass_and_cos_ignores_the_schedule():
    assert pretraining.check_pretraining(defaults()) == [120, 160]
    pretraining.check_pretraining(defaults(cos=True, schedule=["500"]))
    assert linear_classification.check_linear_classification(
        lincls_defaults(schedule=["60", "80"], epochs=100, train_augment=False)
    ) == [60, 80]
    with pytest.raises(configs.ConfigError, match="--notrain_augment"):
        linear_classification.check_linear_classification(
            lincls_defaults(cache_features=True, train_augment=True)
        )


def test_linear_classifier_starts_as_main_lincls():
    """fc.weight ~ N(0, 0.01), fc.bias = 0 (main_lincls.py)."""
    head = linear_classification.linear_head(2048, 1000)
    head.build((None, 2048))
    kernel = keras.ops.convert_to_numpy(head.kernel)
    assert kernel.std() == pytest.approx(0.01, rel=0.01)
    assert abs(kernel.mean()) < 1e-4
    assert np.abs(kernel).max() > 0.045  # normal, not truncated at 2 std
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(head.bias), 0.0)


def test_backbone_check_reads_the_checkpoint_back(tmp_path):
    from support import conv_bn_encoder
    from support import make_moco

    path = str(tmp_path / "ckpt-000000001.keras")
    make_moco(conv_bn_encoder(bn_splits=2)).save(path)
    backbone, normalization = linear_classification.load_backbone(path)
    assert normalization is None
    linear_classification.check_backbone_unchanged(backbone, path)
    # Changed after loading: found.
    variable = backbone.weights[3]
    variable.assign(variable.value + 1.0)
    with pytest.raises(RuntimeError, match="differs from .* in 1 of"):
        linear_classification.check_backbone_unchanged(backbone, path)
    # Loaded wrong (another model's weights): found too, which a copy taken
    # after loading would not see.
    other = str(tmp_path / "other.keras")
    keras.utils.set_random_seed(1)
    make_moco(conv_bn_encoder(bn_splits=2)).save(other)
    wrong, _ = linear_classification.load_backbone(other)
    with pytest.raises(RuntimeError, match="loaded wrong or changed"):
        linear_classification.check_backbone_unchanged(wrong, path)


def test_pretrained_must_be_a_moco_checkpoint(tmp_path):
    with pytest.raises(configs.ConfigError, match="does not exist"):
        linear_classification.resolve_pretrained(
            str(tmp_path / "missing.keras")
        )
    with pytest.raises(configs.ConfigError, match="without MoCo checkpoints"):
        linear_classification.resolve_pretrained(str(tmp_path))
    text = tmp_path / "notes.keras"
    text.write_text("not a zip")
    with pytest.raises(configs.ConfigError, match="is not a MoCo checkpoint"):
        linear_classification.load_backbone(str(text))
    inputs = keras.Input((4,))
    plain = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    plain.save(tmp_path / "plain.keras")
    with pytest.raises(
        configs.ConfigError, match="holds a Functional, not a MoCo"
    ):
        linear_classification.load_backbone(str(tmp_path / "plain.keras"))


def test_a_jax_run_compiles_its_step_and_the_others_follow_the_config():
    config = defaults(
        "mocov1",
        arch="cifar_resnet18",
        image_size=8,
        width=2,
        moco_k=16,
        bn_splits=1,
    )
    model = pretraining.build_moco(config, [], 1)
    jax = keras.backend.backend() == "jax"
    # Keras' JAX trainer runs an uncompiled step op by op.
    assert model.jit_compile is jax
    assert configs.jit_compile(
        configs.config(config, run={"jit_compile": True})
    )


def test_linear_probe_separates_clusters_and_not_shuffled_labels():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 600)
    centres = rng.normal(size=(3, 16)) * 3
    features = (centres[labels] + rng.normal(size=(600, 16))).astype("float32")
    train, test = (features[:450], labels[:450]), (features[450:], labels[450:])
    assert evaluation.linear_probe(train, test, 3, epochs=5) > 95
    # Labels that the features do not predict: chance, not a leak.
    shuffled = (features[:450], rng.permutation(labels[:450]))
    assert evaluation.linear_probe(shuffled, test, 3, epochs=5) < 60
    with pytest.raises(configs.ConfigError, match="epochs >= 1"):
        evaluation.linear_probe(train, test, 3, epochs=0)


def test_crop_min_is_the_crops_smallest_area():
    assert pretraining.augmentation_config(defaults())["scale"] == (0.2, 1.0)
    config = defaults(crop_min=0.5, aug_plus=True, blur=False)
    augmentation = pretraining.augmentation_config(config)
    assert augmentation["scale"] == (0.5, 1.0)
    assert augmentation["blur_p"] == 0.0


def test_knn_evaluation_of_a_head_reuses_its_backbones_features(tmp_path):
    from support import fake_fashion_mnist

    fake_fashion_mnist(str(tmp_path), n_train=64, n_test=32)
    config = recipe_defaults(
        presets.PRETRAINING,
        "quickstart",
        data_dir=str(tmp_path),
        image_size=28,
        width=4,
        moco_k=64,
        batch_size=32,
        bn_splits=2,
        knn_k=10,
    )
    model = pretraining.build_moco(config, [], 1)
    # The embedding of evaluation views (the model itself takes uint8
    # crops: its colour layer normalizes them).
    embedding = keras.Sequential([model.encoder_q, model.head_q])
    scores = evaluation.knn_evaluation(
        config,
        {
            "backbone": model.encoder_q,
            "head": ("backbone", model.head_q),
            "model": embedding,
        },
        linear_probe_of=("head", "model"),
        linear_epochs=1,
    )
    # The head on the backbone's features is the embedding's.
    assert scores["head"] == scores["model"]
    assert scores["head linear"] == scores["model linear"]
    assert 0 <= scores["backbone"] <= 100
    with pytest.raises(configs.ConfigError, match="'backbone', which is not"):
        evaluation.knn_evaluation(config, {"head": ("backbone", model.head_q)})


def test_the_docs_list_the_values_a_resume_may_change():
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "docs", "recipes.md")).read()
    paragraph = text[text.index("What may change on a resume") :]
    paragraph = paragraph[: paragraph.index("\n\n")]
    listed = re.findall(r"`--(\w+)`", paragraph)
    resumable = [common.CONFIG_TO_FLAGS[key] for key in configs.RESUMABLE]
    assert sorted(listed) == sorted(resumable)
