"""The model finetune/run.py builds when nothing names one (chosen by benchmarks/realdata.sh)."""

from __future__ import annotations

import torch

from finetune.build import default_model_name
from finetune.config import FALLBACK_MODEL
from hybridvision.models import create_encoder, create_segmenter, save_pretrained
from hybridvision.models.encoders.hybrid import AttentionBlock
from hybridvision.models.registry import segmenter_spec


def test_default_is_a_hybrid_with_a_unet_decoder_to_full_resolution():
    model = create_segmenter(FALLBACK_MODEL, num_classes=2)
    assert segmenter_spec(FALLBACK_MODEL).decoder == "unet"
    assert any(isinstance(m, AttentionBlock) for m in model.encoder.modules())  # attention at depth
    assert any(isinstance(m, torch.nn.Conv2d) for m in model.encoder.modules())  # convs first
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 64, 96)).shape == (1, 2, 64, 96)


def test_default_name_for_each_kind_of_init(tmp_path):
    assert default_model_name("") == FALLBACK_MODEL
    own = save_pretrained(create_encoder(segmenter_spec(FALLBACK_MODEL).encoder), tmp_path / "enc")
    assert default_model_name(str(own)) == FALLBACK_MODEL  # keeps the preset's U-Net decoder
    other = save_pretrained(create_encoder("hybrid_nano"), tmp_path / "enc2")
    assert default_model_name(str(other)) == ""  # the encoder in init decides (+ its default decoder)
    full = save_pretrained(create_segmenter("unet_resnet_nano", num_classes=2), tmp_path / "model")
    assert default_model_name(str(full)) == ""
    assert default_model_name(str(tmp_path / "missing")) == ""  # build_segmenter names the problem
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    assert default_model_name(str(tmp_path / "broken")) == ""
