"""Convert transformers SegFormer directories (``model_type: segformer``) into hybridvision models.

``hub.from_pretrained`` calls :func:`load_transformers_segformer` for such directories, e.g. the
``nvidia/segformer-b*-finetuned-*`` and ``nvidia/mit-b*`` checkpoints or anything written by
``SegformerForSemanticSegmentation.save_pretrained``. transformers itself is not imported: the
config is read as JSON and the weights with safetensors (or ``torch.load(weights_only=True)``).

* ``SegformerForSemanticSegmentation`` -> :class:`~hybridvision.models.Segmenter`
  (MiT encoder + ``segformer_mlp`` decoder);
* ``SegformerModel`` / ``SegformerForImageClassification`` -> the MiT
  :class:`~hybridvision.models.Encoder` (an image-classification ``classifier`` is dropped).

Both the on-disk names (``encoder.block.0.0.attention.self.query``, what every released
checkpoint and transformers' ``save_pretrained`` use) and transformers 5's in-memory names
(``stages.0.blocks.0.attention.q_proj``) are understood. The model is built through the factory
with explicit overrides, so ``save_pretrained`` then ``from_pretrained`` of the result
round-trips. transformers' MiT uses LayerNorm eps 1e-5 everywhere, so the converted encoder gets
``layer_norm_eps=1e-5`` (the official code uses 1e-6 in blocks and stage norms).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from .base import Encoder, Segmenter
from .encoders.mit import MIT_PRESETS
from .factory import create_encoder, create_segmenter
from .registry import list_segmenters, segmenter_spec
from .weights import load_state_dict_file

__all__ = ["load_transformers_segformer", "segformer_config_to_overrides", "convert_segformer_state_dict"]

#: transformers ``SegformerConfig`` defaults, used for keys an old config.json lacks
_HF_DEFAULTS: dict[str, Any] = {
    "num_channels": 3,
    "num_encoder_blocks": 4,
    "depths": [2, 2, 2, 2],
    "sr_ratios": [8, 4, 2, 1],
    "hidden_sizes": [32, 64, 160, 256],
    "patch_sizes": [7, 3, 3, 3],
    "strides": [4, 2, 2, 2],
    "num_attention_heads": [1, 2, 5, 8],
    "mlp_ratios": [4, 4, 4, 4],
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "classifier_dropout_prob": 0.1,
    "drop_path_rate": 0.1,
    "decoder_hidden_size": 256,
}

# (pattern, replacement) on keys without the "segformer." prefix; block-level parts follow below
_STAGE_RULES = [
    (r"^encoder\.patch_embeddings\.(\d+)\.proj\.", r"stages.\1.patch_embed.proj."),
    (r"^encoder\.patch_embeddings\.(\d+)\.layer_norm\.", r"stages.\1.patch_embed.norm."),
    (r"^encoder\.layer_norm\.(\d+)\.", r"stages.\1.norm."),
    (r"^encoder\.block\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"^stages\.(\d+)\.patch_embeddings\.proj\.", r"stages.\1.patch_embed.proj."),
    (r"^stages\.(\d+)\.patch_embeddings\.layer_norm\.", r"stages.\1.patch_embed.norm."),
    (r"^stages\.(\d+)\.layer_norm\.", r"stages.\1.norm."),
]
_BLOCK_PARTS = {
    "layer_norm_1.": "norm1.",
    "layernorm_before.": "norm1.",
    "layer_norm_2.": "norm2.",
    "layernorm_after.": "norm2.",
    "attention.self.query.": "attn.q.",
    "attention.q_proj.": "attn.q.",
    "attention.self.key.": "attn.k.",  # k and v are stacked into attn.kv below
    "attention.k_proj.": "attn.k.",
    "attention.self.value.": "attn.v.",
    "attention.v_proj.": "attn.v.",
    "attention.self.sr.": "attn.sr.",
    "attention.sequence_reduction.sequence_reduction.": "attn.sr.",
    "attention.self.layer_norm.": "attn.norm.",
    "attention.sequence_reduction.layer_norm.": "attn.norm.",
    "attention.output.dense.": "attn.proj.",
    "attention.o_proj.": "attn.proj.",
    "mlp.dense1.": "mlp.fc1.",
    "mlp.fc1.": "mlp.fc1.",
    "mlp.dwconv.dwconv.": "mlp.dwconv.",
    "mlp.dense2.": "mlp.fc2.",
    "mlp.fc2.": "mlp.fc2.",
}
_HEAD_RULES = [
    (r"^decode_head\.(?:linear_c|linear_projections)\.(\d+)\.proj\.", r"decoder.linear_c.\1.proj."),
    (r"^decode_head\.(linear_fuse|batch_norm|classifier)\.", r"decoder.\1."),
]
_BLOCK_KEY = re.compile(r"^(stages\.\d+\.blocks\.\d+\.)(.*)$")


def segformer_config_to_overrides(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Map a transformers SegFormer config to (closest ``mit_*`` preset, encoder overrides).

    Only fields that differ from the preset are returned, so a stock B0 config gives
    ``("mit_b0", {"layer_norm_eps": 1e-5})``.
    """
    cfg = {**_HF_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    if cfg["hidden_act"] != "gelu":
        raise ValueError(f"SegFormer hidden_act={cfg['hidden_act']!r} is not supported (only 'gelu')")
    if cfg["num_encoder_blocks"] != len(cfg["depths"]):
        raise ValueError(f"num_encoder_blocks={cfg['num_encoder_blocks']} but depths={cfg['depths']}")
    arch = {
        "embed_dims": tuple(cfg["hidden_sizes"]),
        "depths": tuple(cfg["depths"]),
        "num_heads": tuple(cfg["num_attention_heads"]),
        "sr_ratios": tuple(cfg["sr_ratios"]),
        "mlp_ratios": tuple(cfg["mlp_ratios"]),
        "patch_sizes": tuple(cfg["patch_sizes"]),
        "strides": tuple(cfg["strides"]),
        "drop_rate": float(cfg["hidden_dropout_prob"]),
        "attn_drop_rate": float(cfg["attention_probs_dropout_prob"]),
        "drop_path_rate": float(cfg["drop_path_rate"]),
        "layer_norm_eps": 1e-5,  # transformers builds every nn.LayerNorm with the default eps
    }

    def distance(name: str) -> int:
        preset = MIT_PRESETS[name]
        return sum(getattr(preset, k) != v for k, v in arch.items())

    exact = [
        n for n, p in MIT_PRESETS.items() if (p.embed_dims, p.depths) == (arch["embed_dims"], arch["depths"])
    ]
    name = min(exact or ["mit_b0"], key=distance)
    preset = MIT_PRESETS[name]
    overrides = {
        k: list(v) if isinstance(v, tuple) else v for k, v in arch.items() if getattr(preset, k) != v
    }
    return name, overrides


def convert_segformer_state_dict(state: dict[str, Tensor], segmenter: bool) -> dict[str, Tensor]:
    """Rename transformers SegFormer weights to hybridvision names (k/v stacked into ``attn.kv``).

    Args:
        state: transformers state dict (with or without the ``segformer.`` prefix).
        segmenter: True for a ``SegformerForSemanticSegmentation`` state (keys get ``encoder.`` /
            ``decoder.`` prefixes); False for an encoder (an image-classification head is dropped).

    Raises:
        ValueError: naming every key that has no counterpart.
    """
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state.items():
        bare = key.removeprefix("segformer.")
        new = _rename(bare, _HEAD_RULES if segmenter else [])
        if new is None:
            if not segmenter and re.match(r"^classifier\.", bare):
                continue  # SegformerForImageClassification head
            unknown.append(key)
            continue
        if not new.startswith("decoder.") and segmenter:
            new = "encoder." + new
        out[new] = value
    if unknown:
        raise ValueError(f"transformers SegFormer keys with no hybridvision counterpart: {unknown}")
    for key in [k for k in out if k.endswith(("attn.k.weight", "attn.k.bias"))]:
        v_key = key.replace("attn.k.", "attn.v.")
        if v_key not in out:
            raise ValueError(f"{key} has no matching value projection {v_key}")
        out[key.replace("attn.k.", "attn.kv.")] = torch.cat([out.pop(key), out.pop(v_key)], dim=0)
    leftover = [k for k in out if ".attn.v." in k]
    if leftover:
        raise ValueError(f"value projections without a key projection: {leftover}")
    return out


def _rename(key: str, head_rules: list[tuple[str, str]]) -> str | None:
    for pattern, repl in head_rules:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    for pattern, repl in _STAGE_RULES:
        if re.match(pattern, key):
            key = re.sub(pattern, repl, key)
            block = _BLOCK_KEY.match(key)
            if block is None:
                return key
            prefix, rest = block.groups()
            for old, new in _BLOCK_PARTS.items():
                if rest.startswith(old) and rest.count(".") == old.count("."):
                    return prefix + new + rest[len(old) :]
            return None
    return None


def _read_weights(directory: Path) -> dict[str, Tensor]:
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    legacy = directory / "pytorch_model.bin"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, Tensor] = {}
        for shard in shards:
            state.update(load_file(str(directory / shard)))
        return state
    if legacy.is_file():
        return load_state_dict_file(legacy)
    raise FileNotFoundError(
        f"{directory} holds no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
    )


def load_transformers_segformer(directory: str | os.PathLike) -> nn.Module:
    """Build a hybridvision model from a transformers SegFormer directory and load its weights.

    Args:
        directory: folder with ``config.json`` and ``model.safetensors`` (or ``pytorch_model.bin``).

    Returns:
        A :class:`~hybridvision.models.Segmenter` for ``SegformerForSemanticSegmentation``,
        otherwise the MiT :class:`~hybridvision.models.Encoder`; ``model.pretrained_config`` holds
        the transformers config (``id2label`` etc.).
    """
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    if config.get("model_type") != "segformer":
        raise ValueError(
            f"{directory} is not a transformers SegFormer (model_type={config.get('model_type')!r})"
        )
    state = _read_weights(directory)
    archs = config.get("architectures") or []
    segmenter = (
        any("SemanticSegmentation" in a for a in archs)
        if archs
        else any(k.startswith("decode_head.") for k in state)
    )
    name, overrides = segformer_config_to_overrides(config)
    in_chans = int(config.get("num_channels", 3))
    if segmenter:
        num_labels = len(config["id2label"]) if config.get("id2label") else int(config.get("num_labels", 2))
        seg_name = f"segformer_{name.removeprefix('mit_')}"
        if seg_name not in list_segmenters() or segmenter_spec(seg_name).encoder != name:
            seg_name = name
        decoder_kwargs = {
            "embed_dim": int(config.get("decoder_hidden_size", _HF_DEFAULTS["decoder_hidden_size"])),
            "dropout": float(config.get("classifier_dropout_prob", _HF_DEFAULTS["classifier_dropout_prob"])),
        }
        model: Segmenter | Encoder = create_segmenter(
            seg_name, num_classes=num_labels, in_chans=in_chans, decoder_kwargs=decoder_kwargs, **overrides
        )
    else:
        model = create_encoder(name, in_chans=in_chans, **overrides)
    converted = convert_segformer_state_dict(state, segmenter)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{directory}: converted weights do not match the {model.build_kwargs['name']!r} model built from its "
            f"config: missing {missing}, unexpected {unexpected}"
        )
    bad = [
        f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in converted.items()
        if v.shape != expected[k].shape
    ]
    if bad:
        raise ValueError(f"{directory}: shape mismatch between checkpoint and config: {bad}")
    model.load_state_dict(converted, strict=True)
    model.pretrained_config = config
    return model
