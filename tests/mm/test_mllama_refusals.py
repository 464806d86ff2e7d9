"""Bad Llama 3.2 Vision checkpoints (copies of the tiny random Mllama model of `test_mllama.py`, one thing
broken each) are refused with the file, the key, what was found and what was expected."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mm import load_hf_mllama
from mm.formats.hf_mllama import MllamaCheckpointError
from tests.mm.test_mllama import VOCAB, save_tiny_mllama


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The tiny random Mllama checkpoint the tests copy and break."""
    path = tmp_path_factory.mktemp("mllama") / "tiny"
    return {"path": path, "hf": save_tiny_mllama(path)}


def bad_copy(ckpt, tmp_path, edit_config=None, edit_tensors=None, edit_preprocessor=None) -> Path:
    path = tmp_path / "bad"
    shutil.copytree(ckpt["path"], path)
    for name, edit in (("config.json", edit_config), ("preprocessor_config.json", edit_preprocessor)):
        if edit is not None:
            d = json.loads((path / name).read_text())
            edit(d)
            (path / name).write_text(json.dumps(d))
    if edit_tensors is not None:
        sd = load_file(str(path / "model.safetensors"))
        edit_tensors(sd)
        save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


XK = "language_model.model.layers.4.cross_attn.k_norm.weight"
FC1 = "vision_model.transformer.layers.1.mlp.fc1.weight"
BAD_INPUTS = {
    "missing tensor": (
        dict(edit_tensors=lambda sd: sd.pop(XK)),
        rf"tensor '{XK}' is missing; expected shape \(16,\)",
    ),
    "mis-shaped tensor": (
        dict(edit_tensors=lambda sd: sd.__setitem__(FC1, torch.zeros(65, 32))),
        rf"tensor '{FC1}' has shape \(65, 32\), expected \(64, 32\)",
    ),
    "unexpected tensor": (
        dict(edit_tensors=lambda sd: sd.__setitem__("vision_model.extra.weight", torch.zeros(2))),
        r"unexpected tensor 'vision_model\.extra\.weight'",
    ),
    "aspect-ratio list": (
        dict(
            edit_config=lambda d: d["vision_config"].__setitem__(
                "supported_aspect_ratios", [[1, 1], [2, 1], [1, 2]]
            )
        ),
        r"supported_aspect_ratios: found \[\[1, 1\], \[2, 1\], \[1, 2\]\], expected \[\[1, 1\], \[1, 2\], \[1, 3\]",
    ),
    "max_num_tiles 0": (
        dict(edit_config=lambda d: d["vision_config"].__setitem__("max_num_tiles", 0)),
        r"vision_config\.max_num_tiles: found 0, expected an int >= 1",
    ),
    "max_num_tiles with another grid list": (
        dict(edit_config=lambda d: d["vision_config"].__setitem__("max_num_tiles", 2)),
        r"supported_aspect_ratios: found \[\[1, 1\], .*\[4, 1\]\], expected \[\[1, 1\], \[1, 2\], \[2, 1\]\] .*max_num_tiles=2",
    ),
    "vision output vs projector": (
        dict(edit_config=lambda d: d["vision_config"].__setitem__("vision_output_dim", 64)),
        r"vision_config\.vision_output_dim: found 64, expected 96",
    ),
    "text width vs projector": (
        dict(edit_config=lambda d: d["text_config"].__setitem__("hidden_size", 32)),
        r"tensor '.*' has shape \(\d+, 64\), expected \(\d+, 32\)",
    ),
    "image token outside the vocabulary": (
        dict(edit_config=lambda d: d.__setitem__("image_token_index", VOCAB + 8)),
        rf"image_token_index: found {VOCAB + 8}, expected an id in \[0, {VOCAB + 8}\)",
    ),
    "adjacent cross-attention layers": (
        dict(edit_config=lambda d: d["text_config"].__setitem__("cross_attention_layers", [1, 2])),
        r"text_config\.cross_attention_layers: found \[1, 2\], expected",
    ),
    "processor tiles vs vision tiles": (
        dict(edit_preprocessor=lambda d: d.__setitem__("max_image_tiles", 2)),
        r"max_image_tiles: found 2, expected 4",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_checkpoints_are_refused_naming_key_found_and_expected(ckpt, tmp_path, case):
    edits, message = BAD_INPUTS[case]
    path = bad_copy(ckpt, tmp_path, **edits)
    with pytest.raises(MllamaCheckpointError, match=message) as e:
        load_hf_mllama(path)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda sd: sd.pop("norm.weight"), r"no tensor maps to model key 'lm\.norm\.weight' \(1 such keys\)"),
        (
            lambda sd: sd.__setitem__("layers.0.extra.weight", torch.zeros(2)),
            r"tensor mapped to 'lm\.layers\.0\.extra\.weight' \(1 such tensors\) has no place",
        ),
    ],
    ids=["tensor the model needs", "tensor the model lacks"],
)
def test_weights_that_do_not_fill_the_model_are_refused_with_a_message(ckpt, monkeypatch, edit, message):
    """The last check of `load_hf_mllama` (mapped weights vs the model's keys) is a ValueError naming the weights
    file, the key and config.json, never a bare assert (which `python -O` would also skip)."""
    import mm.formats.hf_mllama.load as mllama

    real = mllama._lm_state_from_mllama

    def mapped_wrongly(hf, spec):
        sd = real(hf, spec)
        edit(sd)
        return sd

    monkeypatch.setattr(mllama, "_lm_state_from_mllama", mapped_wrongly)
    with pytest.raises(MllamaCheckpointError, match=message) as e:
        load_hf_mllama(ckpt["path"])
    text = str(e.value)
    assert text.startswith(str(ckpt["path"] / "model.safetensors") + ":")
    assert str(ckpt["path"] / "config.json") in text and isinstance(e.value, ValueError)
