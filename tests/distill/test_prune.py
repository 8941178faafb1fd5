"""Structured pruning of the student (``student.prune``): the fraction of channels removed, the
importance criteria against naive computations, the save -> from_pretrained round trip, and a pruned
distillation run that trains, exports ONNX, loads again and resumes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("torch_pruning")

from distill.prune import classifier_layer, prune_model  # noqa: E402
from hybridvision.models import create_segmenter, from_pretrained, save_pretrained  # noqa: E402

EXAMPLE = torch.zeros(1, 3, 64, 64)


def _segmenter(name: str = "unet_resnet_nano", num_classes: int = 3, seed: int = 0) -> nn.Module:
    """A segmenter with random BatchNorm affine weights (fresh ones are all 1: every norm would tie)."""
    torch.manual_seed(seed)
    model = create_segmenter(name, num_classes, 3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.2, 2.0)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.7])
@pytest.mark.parametrize("name", ["unet_resnet_nano", "sequential_unet_tiny"])
def test_pruning_removes_the_fraction_of_channels_and_keeps_the_interface(name: str, ratio: float):
    model = _segmenter(name).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before_out = model(x)
    before = {n: c.out_channels for n, c in _convs(model).items()}
    head = classifier_layer(model, EXAMPLE)
    report = prune_model(model, ratio, EXAMPLE)
    after = {n: c.out_channels for n, c in _convs(model).items()}
    head_name = next(n for n, c in _convs(model).items() if c is head)
    assert head.out_channels == 3 and after[head_name] == before[head_name]
    assert _convs(model)[next(iter(before))].in_channels == 3  # the input channels stay
    pruned = {n for n in before if after[n] != before[n]}
    for n in pruned:  # every pruned layer keeps (1 - ratio) of its channels, ± rounding
        assert abs(after[n] - before[n] * (1 - ratio)) <= 1, (n, before[n], after[n])
    kept_whole = set(before) - pruned - {head_name}
    if name == "unet_resnet_nano":  # a pure CNN: every convolution but the classifier is pruned
        assert kept_whole == set()
    else:  # the last stage feeds the Transformer refinement (Linear layers): kept whole
        assert kept_whole and all(n.startswith("encoder.stages.3.") for n in kept_whole), kept_whole
    c0, c1 = report.channels
    assert c0 == sum(before.values()) - 3 and c1 == sum(after.values()) - 3
    q0, q1 = report.pruned_channels
    assert q0 == sum(before[n] for n in pruned) and q1 == sum(after[n] for n in pruned)
    assert q1 / q0 == pytest.approx(1 - ratio, abs=0.03)  # the requested fraction of the prunable ones
    assert (q0 == c0) == (name == "unet_resnet_nano")
    assert report.params[1] < report.params[0] and report.gmacs[1] < report.gmacs[0]
    with torch.no_grad():
        out = model(x)
        feats = model.encoder.forward_features(x)
    assert out.shape == before_out.shape and torch.isfinite(out).all()
    assert model.encoder.out_channels == tuple(f.shape[1] for f in feats)
    # the pruned model still trains: every parameter gets a gradient
    model.train()
    model(x).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def _kept(original: torch.Tensor, pruned: torch.Tensor) -> list[int]:
    """Indices of ``original`` (1-D, distinct values) that survive in ``pruned``."""
    return [int((original == v).nonzero()) for v in pruned]


# one layer whose channel group is simple: conv1 (out) -> BatchNorm -> ReLU -> conv2 (in)
LAYER = "decoder.blocks.1.conv1"


def _group_tensors(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    block = model.get_submodule(LAYER.rsplit(".", 1)[0])
    conv1, bn, conv2 = block.conv1[0], block.conv1[1], block.conv2[0]
    return conv1.weight, bn.weight, conv2.weight


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_magnitude_removes_the_channels_of_smallest_group_l2_norm(ratio: float):
    model = _segmenter(seed=1)
    w1, gamma, w2 = (t.detach().clone() for t in _group_tensors(model))
    # naive group L2 norm (DepGraph): each channel's weights over every coupled layer, squared and summed
    norm = w1.flatten(1).pow(2).sum(1) + gamma.pow(2) + w2.transpose(0, 1).flatten(1).pow(2).sum(1)
    n = len(gamma)
    keep = n - int(round(n * ratio))
    expected = sorted(norm.argsort(descending=True)[:keep].tolist())
    smallest_filter_norm = sorted(w1.flatten(1).norm(dim=1).argsort(descending=True)[:keep].tolist())
    assert expected != smallest_filter_norm  # the test tells the group criterion from the filter-only one
    prune_model(model, ratio, EXAMPLE, "magnitude")
    pruned_gamma = _group_tensors(model)[1].detach()
    assert len(pruned_gamma) == keep
    assert sorted(_kept(gamma, pruned_gamma)) == expected


def test_taylor_removes_the_channels_of_smallest_weight_times_gradient():
    from hybridvision.losses import build_segmentation_loss

    model = _segmenter(seed=2).eval()
    task = build_segmentation_loss(3, 255)
    torch.manual_seed(3)
    batches = [(torch.randn(2, 3, 64, 64), torch.randint(0, 3, (2, 64, 64))) for _ in range(2)]

    def loss_fn(logits, masks):
        return task(logits, masks).total

    for images, masks in batches:  # the naive computation: gradients summed over the batches
        loss_fn(model(images), masks).backward()
    tensors = _group_tensors(model)
    w1, gamma, w2 = ((t.detach() * t.grad).abs() for t in tensors)
    score = w1.flatten(1).sum(1) + gamma + w2.transpose(0, 1).flatten(1).sum(1)
    gamma_before = tensors[1].detach().clone()
    model.zero_grad(set_to_none=True)
    keep = len(score) // 2
    expected = sorted(score.argsort(descending=True)[:keep].tolist())
    prune_model(model, 0.5, EXAMPLE, "taylor", batches, loss_fn)
    assert sorted(_kept(gamma_before, _group_tensors(model)[1].detach())) == expected
    # and it is not the magnitude criterion
    other = _segmenter(seed=2)
    prune_model(other, 0.5, EXAMPLE, "magnitude")
    assert _kept(gamma_before, _group_tensors(other)[1].detach()) != _kept(
        gamma_before, _group_tensors(model)[1].detach()
    )


@pytest.mark.parametrize("name", ["unet_resnet_nano", "sequential_unet_tiny"])
def test_save_from_pretrained_round_trip_is_exact(name: str, tmp_path: Path):
    model = _segmenter(name, num_classes=2)
    prune_model(model, 0.5, EXAMPLE)
    save_pretrained(model, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["hybridvision"]["pruned"]  # the pruned shapes are recorded
    loaded = from_pretrained(tmp_path / "m")
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.encoder.out_channels == model.encoder.out_channels
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded.eval()(x))
    # saved again, the loaded model writes the same architecture
    save_pretrained(loaded, tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["hybridvision"] == config["hybridvision"]
    # without the record the factory's shapes do not fit the weights: the record is what rebuilds it
    config["hybridvision"].pop("pruned")
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(RuntimeError, match="size mismatch"):
        from_pretrained(tmp_path / "m")


def test_a_model_nothing_of_which_can_be_pruned_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 2, 1))  # the classifier alone: the interface is kept
    with pytest.raises(ValueError, match="nothing of Sequential can be removed"):
        prune_model(model, 0.5, EXAMPLE)


def _attention_importance(attn) -> torch.Tensor:
    """Naive group L2 norm of each head: its q, k, v rows of qkv (weights and bias) and proj columns."""
    heads, inner = attn.num_heads, attn.qkv.out_features // 3
    d = inner // heads
    w = attn.qkv.weight.detach().reshape(3, heads, d, -1)
    b = attn.qkv.bias.detach().reshape(3, heads, d)
    p = attn.proj.weight.detach().reshape(-1, heads, d)
    return (w.pow(2).sum((0, 2, 3)) + b.pow(2).sum((0, 2)) + p.pow(2).sum((0, 2))).sqrt()


def test_attention_loses_whole_heads_and_mlps_their_hidden_width():
    from hybridvision.models.layers.attention import Attention
    from hybridvision.models.layers.common import Mlp

    model = _segmenter("sequential_unet_tiny").eval()
    attn = [m for m in model.modules() if isinstance(m, Attention)]
    heads0 = [m.num_heads for m in attn]
    width = attn[0].qkv.out_features // 3 // heads0[0]
    qkv0 = attn[0].qkv.weight.detach().clone().reshape(3, heads0[0], width, -1)
    norms = _attention_importance(attn[0])
    hidden0 = [m.fc1.out_features for m in model.modules() if isinstance(m, Mlp)]
    x = torch.randn(2, 3, 64, 64)
    report = prune_model(model, 0.5, EXAMPLE)
    assert [m.num_heads for m in attn] == [h // 2 for h in heads0] and report.heads == (
        sum(heads0),
        sum(heads0) // 2,
    )
    for m in attn:  # the head width stays; qkv and proj lose whole heads
        assert m.qkv.out_features == 3 * m.num_heads * width and m.proj.in_features == m.num_heads * width
    # the kept heads are the ones of largest group norm (the heads' own weights; the same ranking
    # holds for the group when proj is included, checked above through _attention_importance)
    kept = sorted(norms.topk(heads0[0] // 2).indices.tolist())
    torch.testing.assert_close(attn[0].qkv.weight.reshape(3, -1, width, qkv0.shape[-1]), qkv0[:, kept])
    assert [m.fc1.out_features for m in model.modules() if isinstance(m, Mlp)] == [h // 2 for h in hidden0]
    assert "attention heads 32 -> 16" in report.summary()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()


def test_missing_torch_pruning_names_the_extra(monkeypatch):
    from hybridvision.config import ConfigError

    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # import fails
    with pytest.raises(ConfigError, match=r"\.\[prune\]"):
        prune_model(_segmenter(), 0.5, EXAMPLE)


def test_student_config_validates_prune():
    from distill.config import DistillConfig
    from hybridvision.config import ConfigError, load_config

    cfg = load_config(DistillConfig, overrides=["student.prune=0.5", "student.prune_importance=taylor"])
    assert cfg.student.prune == 0.5 and cfg.student.prune_importance == "taylor"
    for bad in (["student.prune=1.0"], ["student.prune=-0.1"], ["student.prune_batches=0"]):
        with pytest.raises(ConfigError, match="student.prune"):
            load_config(DistillConfig, overrides=bad)
    with pytest.raises(ConfigError, match="copy of the teacher"):
        load_config(DistillConfig, overrides=["student.prune=0.5", "student.decoder=segformer_mlp"])
    with pytest.raises(ConfigError):
        load_config(DistillConfig, overrides=["student.prune_importance=random"])


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def _run(overrides: list[str]) -> dict:
    import distill.run as run
    from distill.config import DistillConfig
    from hybridvision.config import load_config

    _reset_accelerate()
    try:
        return run.main(load_config(DistillConfig, overrides=overrides))
    finally:
        _reset_accelerate()


@pytest.mark.slow  # two short distillation runs in this process (a resumed one) and an ONNX export
def test_pruned_distillation_trains_exports_onnx_loads_and_resumes(tmp_path: Path, capsys):
    import onnxruntime as ort

    teacher = _segmenter("unet_resnet_nano", num_classes=4)
    save_pretrained(teacher, tmp_path / "teacher")
    out = tmp_path / "out"
    args = [
        f"teacher={tmp_path / 'teacher'}",
        f"train.output_dir={out}",
        "train.batch_size=2",
        "train.ckpt_every=1",
        "train.eval_every=0",
        "train.progress_bar=false",
        "train.trackers=[]",
        "data.synthetic_samples=8",
        "data.synthetic_val_samples=2",
        "optim.warmup_steps=0",
        "student.prune=0.5",
        "student.prune_importance=taylor",
        "student.prune_batches=1",
        "export.report=false",
    ]
    summary = _run([*args, "train.max_steps=2"])
    log = capsys.readouterr().out
    assert "a copy of the teacher" in log and "pruned 50.0% of the prunable convolution channels" in log
    student = from_pretrained(out / "student").eval()
    assert student.build_kwargs["name"] == "unet_resnet_nano"
    assert summary["params"]["student"] < 0.5 * summary["params"]["teacher"]
    assert summary["params"]["student"] == sum(p.numel() for p in student.parameters())
    # it trained: the weights moved away from the pruned copy of the teacher's
    step1 = from_pretrained(out / "checkpoints" / "step_00000001" / "export")
    assert not all(torch.equal(a, b) for a, b in zip(step1.parameters(), student.parameters()))
    # the ONNX export of the pruned student computes what PyTorch does
    session = ort.InferenceSession(str(out / "student.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, 64, 64)
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(onnx_out), student(x), atol=1e-4, rtol=1e-4)
    # a resumed run rebuilds the pruned architecture from the checkpoint and carries on
    _run([*args, "train.max_steps=3", "train.resume=auto"])
    log = capsys.readouterr().out
    assert "resumed from" in log and "at step 2" in log and "pruned 50.0%" not in log
    resumed = from_pretrained(out / "student")
    assert [p.shape for p in resumed.parameters()] == [p.shape for p in student.parameters()]
