"""Every method's default settings are the ones its page says (docs/methods/README.md, "What every fine-tuning
method shares", and each method's "Settings" table), most of them the official code's. The values below are copied
by hand from those tables, so a default changed in the code without the page (or the other way round) fails here."""

from __future__ import annotations

import pytest

from components.methods import get_method

SHARED = {  # docs/methods/README.md
    "optimizer": "adamw",
    "lr": 1e-5,
    "weight_decay": 0.0,
    "betas": (0.9, 0.999),
    "momentum": 0.9,
    "epochs": 1,
    "iterations": None,
    "batch_size": 64,
    "warmup_steps": 0,
    "schedule": "cosine",
    "min_lr": 0.0,
    "grad_clip": None,
    "label_smoothing": 0.0,
    "augment": True,
    "checkpoint_every": None,
    "per_task": {},
    "loss_classes": "task",
    "memory_per_class": 0,
    "memory_size": 0,
    "classifier": "text",
}
MTIL = {
    "lr": 1e-5,
    "iterations": 1000,
    "batch_size": 64,
    "warmup_steps": 100,
    "label_smoothing": 0.2,
}  # docs/methods/finetune.md
REFERENCE = {  # docs/methods/README.md, "What every fine-tuning method shares"
    "reference_set": None,
    "reference_size": 1000,
    "reference_batch_size": 64,
    "reference_seed": 42,
    "reference_caption": None,
}

DOCUMENTED = {
    "finetune": {**SHARED, **MTIL},
    "lwf": {**SHARED, **MTIL, "temperature": 2.0, "distill_weight": 1.0, "cache_teacher": True},
    "wise-ft": {**SHARED, **MTIL, "alpha": 0.8},
    "zscl": {
        **SHARED,
        **MTIL,
        **REFERENCE,
        "temperature": 2.0,
        "distill_weight": 1.0,
        "l2_weight": 1.0,
        "ensemble_every": 100,
    },
    "gnsp": {
        **SHARED,
        **MTIL,
        **REFERENCE,
        "cd_weight": 1.0,
        "map_weight": 0.75,
        "temperature": 2.0,
        "rho": 0.15,
        "project": "gradient",
        "gram_batch_size": 16,
    },
    "sg": {
        **SHARED,
        "optimizer": "sgd",
        "lr": 0.01,
        "momentum": 0.9,
        "weight_decay": 2e-4,
        "grad_clip": 10000.0,
        "schedule": "constant",
        "epochs": 10,
        "batch_size": 256,
        "kappa": 13.0,
        "kd_temperature": 4.0,
        "rl_weight": 0.5,
        "kd_weight": 0.5,
        "loss_classes": "seen",
        "memory_per_class": 20,
        "parity": True,
    },
    "ctp": {
        **SHARED,
        "lr": 1e-4,
        "weight_decay": 0.05,
        "schedule": "cosine",
        "min_lr": 1e-6,
        "warmup_steps": 0,
        "epochs": 5,
        "batch_size": 128,
        "tau": 0.07,
        "queue_size": 1024,
        "momentum_first_task": 0.995,
        "momentum": 0.9,
        "alpha": 0.5,
        "cmc_weight": 1.0,
        "tp_cross_weight": 1.0,
        "tp_intra_weight": 1.0,
        "cache_reference": True,
    },
    "cvm": {
        **SHARED,
        "language_model": "backbone",
        "prompt": None,
        "tau": 0.07,
        "loss_classes": "seen",
        "pull_weight": 1.0,
        "drift_weight": 1.0,
        "memory_per_class": 5,
        "replay": "balanced",
        "lr": 1e-4,
        "weight_decay": 0.0,
        "epochs": 5,
        "batch_size": 64,
        "warmup_steps": 0,
    },
    "lvp": {  # docs/methods/lvp.md
        "variant": "lvp-i",
        "mode": "mean",
        "metric": "cosine",
        "clusters": 4,
        "cluster_iters": 10,
        "it_text_init": 0.5,
        "it_image_init": 1.0,
        "it_lr": 1e-4,
        "it_epochs": 100,
        "it_batch": 256,
        "it_double_softmax": False,
        "c_lr": 1e-2,
        "c_epochs": 150,
        "seed": 0,
    },
    "zeroshot": {},
}


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_default_settings_are_the_documented_ones(name):
    settings = get_method(name).Settings().model_dump()
    settings.pop("pool", None)  # the LVP settings of classifier: pool, checked as lvp's own
    documented = DOCUMENTED[name]
    assert sorted(settings) == sorted(documented), set(settings) ^ set(documented)
    for key, value in documented.items():
        assert settings[key] == value, f"{name}.{key}: {settings[key]!r}, documented {value!r}"


def test_the_pool_of_a_fine_tuned_encoder_defaults_to_lvps_own_settings():
    assert get_method("finetune").Settings().pool.model_dump() == DOCUMENTED["lvp"]
