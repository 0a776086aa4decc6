"""The method a pretraining config names (`moco_keras.methods`): every
preset names one, shared code asks it rather than inferring it, and a run
started before configs named their method still resumes."""

import json
import os

import pytest
from support import recipe_defaults

from moco_keras import configs
from moco_keras import linear_classification
from moco_keras import methods
from moco_keras import presets
from moco_keras import pretraining
from moco_keras import runs
from moco_keras.moco import MoCo
from moco_keras.mocov3 import MoCoV3
from moco_keras.recipes import common


def tiny(preset, **flags):
    """`preset` at a size that builds in a second."""
    small = {"image_size": 8, "batch_size": 8, "workdir": "/tmp/unused"}
    if "mocov3" in preset:
        small.update(moco_mlp_dim=8, moco_dim=4)
    else:
        small.update(moco_k=16, moco_dim=4, bn_splits=2)
    return recipe_defaults(
        presets.PRETRAINING,
        preset,
        arch="cifar_resnet18",
        width=2,
        **{**small, **flags},
    )


@pytest.mark.parametrize("name", sorted(presets.PRETRAINING))
def test_every_pretraining_preset_names_its_method(name):
    config = presets.PRETRAINING[name]
    method = methods.get(config)
    assert method is methods.METHODS[config["method"]]
    assert sorted(config["model"]) == sorted(method.model_keys)
    v3 = name.startswith(("mocov3", "quickstart_mocov3"))
    assert (config["method"] == "mocov3") == v3


def test_the_method_is_named_not_inferred():
    # v1's preset with all of v2's changes (the v2 paper's ablation path)
    # stays MoCo v1 by name and takes v2's views by `aug_plus`.
    config = recipe_defaults(
        presets.PRETRAINING, "mocov1", aug_plus=True, mlp=True, moco_t=0.2
    )
    method = methods.get(config)
    assert method.title == "MoCo v1"
    assert method.views(config) == "mocov2"
    assert methods.get(presets.PRETRAINING["mocov2"]).title == "MoCo v2"
    assert methods.get(presets.PRETRAINING["mocov3_r50"]).title == "MoCo v3"


def test_a_config_without_a_known_method_is_refused():
    config = presets.get(presets.PRETRAINING, "mocov2")
    del config["method"]
    with pytest.raises(
        configs.ConfigError, match="one of mocov1, mocov2, mocov3"
    ):
        methods.get(config)
    with pytest.raises(configs.ConfigError, match="'simclr' is not a method"):
        methods.get({**config, "method": "simclr"})


def test_another_methods_model_values_are_refused_before_any_data():
    config = configs.config(tiny("mocov2"), method="mocov3")
    with pytest.raises(configs.ConfigError) as error:
        pretraining.check_pretraining(config)
    message = str(error.value)
    assert "'mocov3' takes the model values dim, mlp_dim" in message
    assert "queue_size" in message and "--preset" in message


@pytest.mark.parametrize(
    "preset, model_class, head",
    [
        ("mocov1", MoCo, "head_q"),
        ("mocov2", MoCo, "head_q"),
        ("quickstart_mocov3", MoCoV3, "projector_q"),
    ],
)
def test_each_method_builds_its_model_and_names_its_head(
    preset, model_class, head
):
    config = tiny(preset)
    pretraining.check_pretraining(config)
    method = methods.get(config)
    model = pretraining.build_moco(config, [], 1)
    assert type(model) is model_class
    assert method.query_head(model) is getattr(model, head)
    queue = method.queue_size(config)
    assert queue == (16 if model_class is MoCo else None)


def test_a_run_from_before_configs_named_their_method_resumes(tmp_path):
    config = tiny("mocov2", workdir=str(tmp_path))
    legacy = json.loads(json.dumps(config))
    del legacy["method"]
    runs.write_json_atomically(str(tmp_path / configs.CONFIG_FILE), legacy)
    os.makedirs(tmp_path / "checkpoints")
    (tmp_path / "checkpoints" / "ckpt-000000004.keras").write_bytes(b"")
    configs.check_resume(config)
    # v1 with v2's values is the same run: its sections are the same.
    configs.check_resume(configs.config(config, method="mocov1"))
    # A config.json that names its method keeps it.
    runs.write_json_atomically(str(tmp_path / configs.CONFIG_FILE), config)
    with pytest.raises(configs.ConfigError, match="method: 'mocov2' in its"):
        configs.check_resume(configs.config(config, method="mocov1"))


def test_a_bad_model_value_is_named_by_the_flag_that_sets_it():
    for preset, flag, printed in (
        ("quickstart_mocov3", {"moco_mlp_dim": 0}, "--moco_mlp_dim: `mlp_dim`"),
        ("mocov2", {"moco_k": 0}, "--moco_k: `queue_size` (K) must"),
    ):
        with pytest.raises(configs.ConfigError) as error:
            pretraining.check_pretraining(tiny(preset, **flag))
        assert printed in common.in_flag_names(str(error.value))


def test_the_linear_protocol_is_the_pretraining_methods(tmp_path):
    def workdir(name, preset, **flags):
        path = tmp_path / name
        os.makedirs(path / "checkpoints")
        config = recipe_defaults(presets.PRETRAINING, preset, **flags)
        runs.write_json_atomically(str(path / configs.CONFIG_FILE), config)
        return str(path)

    v2 = workdir("v2", "mocov2")
    assert linear_classification.linear_preset(v2) == (
        "imagenet",
        "the pretraining run's method (MoCo v2, resnet50)",
    )
    v3 = workdir("v3", "mocov3_r50")
    assert linear_classification.linear_preset(v3)[0] == "mocov3"
    # A checkpoint in the run's checkpoints/ folder names the same run.
    checkpoint = os.path.join(v3, "checkpoints", "ckpt-000000001.keras")
    assert linear_classification.linear_preset(checkpoint)[0] == "mocov3"
    vit = workdir("vit", "mocov3_vit_small")
    assert linear_classification.linear_preset(vit)[0] == "mocov3_vit"
    # A converted official v3 ViT checkpoint: its kind and architecture.
    converted = tmp_path / "converted"
    os.makedirs(converted)
    (converted / "conversion.json").write_text(
        json.dumps({"kind": "mocov3", "arch": "vit_base"})
    )
    assert linear_classification.linear_preset(str(converted))[0] == (
        "mocov3_vit"
    )
    for kind, preset in (("moco", "imagenet"), ("classifier", "imagenet")):
        (converted / "conversion.json").write_text(
            json.dumps({"kind": kind, "arch": "resnet50"})
        )
        found = linear_classification.linear_preset(str(converted))
        assert found[0] == preset and (found[1] is None) == (kind != "moco")
    # What names no method keeps the default protocol, and says nothing.
    legacy = workdir("legacy", "mocov3_r50")
    config = json.loads((tmp_path / "legacy" / "config.json").read_text())
    del config["method"]
    runs.write_json_atomically(str(tmp_path / "legacy" / "config.json"), config)
    for path in (legacy, str(tmp_path / "nothing"), None):
        assert linear_classification.linear_preset(path) == ("imagenet", None)
