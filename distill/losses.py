"""Distillation losses for dense prediction: pixel KD, channel-wise KD, DIST and feature matching.

Every loss compares the student's logits or features with a frozen teacher's and returns a scalar.
Logits are ``(B, K, H, W)``; when teacher and student predict at different resolutions, both are
resized (bilinear, ``align_corners=False``) to one grid first (:func:`align_logits`). Pixels whose
label is ``ignore_index`` are excluded through a ``valid`` mask ``(B, H, W)`` (bool); ``valid=None``
means every pixel counts (unlabelled images). For KD and DIST, whose softmax runs over the classes,
a 1-logit binary model is read as the two-class logits ``[0, z]`` (:func:`as_two_class`): a softmax
over a single channel is identically 1 and would make those terms silently zero. CWD's softmax runs
over space, so it takes the single channel as it is (C = 1), as the reference formula does.

Distributed training (DDP), and what 2 processes x B equals:

* Means over pixels or images are *global*: KD (over valid pixels), CWD (over images x channels),
  DIST's inter-class term (over valid pixels) and the feature term (over feature elements). With
  ``gather_distributed`` the count is all-reduced (no gradient) and each process returns
  ``W * local_sum / global_count``; the mean over processes is then the mean over the whole batch,
  and DDP's gradient average its gradient, so 2 x B gives the same loss and gradients as 1 x 2B
  even when the processes hold different numbers of ignored pixels.
* DIST's intra-class term is a *per-batch statistic*: a Pearson correlation across the valid pixels
  of the process's own batch. Under DDP the loss is the mean over processes of each one's term, which
  depends on how the batch is split (2 x B differs from 1 x 2B); it is not synchronised.
* The task loss is whatever ``DistillCriterion``'s ``task`` computes; ``hybridvision.losses``'
  per-pixel losses average over the process's own valid pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from distill.config import KDConfig

__all__ = [
    "as_two_class",
    "align_logits",
    "confident_pixels",
    "kd_loss",
    "cwd_loss",
    "dist_loss",
    "FeatureDistiller",
    "match_stages",
    "DistillCriterion",
    "DistillOutput",
]


def as_two_class(logits: Tensor) -> Tensor:
    """``(B, 1, H, W)`` binary logits ``z`` -> ``(B, 2, H, W)`` logits ``[0, z]``; others unchanged.

    ``softmax([0, z]) = [1 - sigmoid(z), sigmoid(z)]``, so the two-class view carries exactly the
    binary model's probabilities.
    """
    if logits.shape[1] != 1:
        return logits
    return torch.cat([torch.zeros_like(logits), logits], dim=1)


def align_logits(
    student: Tensor, teacher: Tensor, size: tuple[int, int] | None = None, to: str = "student"
) -> tuple[Tensor, Tensor]:
    """Resize student and teacher logits ``(B, K, h, w)`` to one grid.

    Args:
        student: (B, K, Hs, Ws) logits.
        teacher: (B, K, Ht, Wt) logits.
        size: explicit target (H, W), e.g. the label's size; overrides ``to``.
        to: ``"student"`` or ``"teacher"``: whose resolution to use when ``size`` is None.
    """
    if size is None:
        size = tuple(student.shape[-2:]) if to == "student" else tuple(teacher.shape[-2:])
    size = (int(size[0]), int(size[1]))

    def resize(x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) == size:
            return x
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    return resize(student), resize(teacher)


def confident_pixels(teacher: Tensor, threshold: float) -> Tensor:
    """Pixels where the teacher is confident: its largest class probability is at least ``threshold``.

    The probabilities are the teacher's own (temperature 1, not the softened KD targets); a 1-logit
    binary model's are ``max(p, 1 − p)`` with ``p = sigmoid(z)`` (read through :func:`as_two_class`).
    FixMatch (Sohn et al., NeurIPS 2020) keeps a pseudo-label where this is above 0.95.

    Args:
        teacher: (B, K, H, W) teacher logits.
        threshold: the confidence a pixel needs, in [0, 1).

    Returns:
        (B, H, W) bool.
    """
    probs = F.softmax(as_two_class(teacher.detach().float()), dim=1)  # (B, max(K, 2), H, W)
    return probs.amax(dim=1) >= threshold


def _resize_mask(mask: Tensor, size: tuple[int, ...]) -> Tensor:
    """(B, h, w) bool -> (B, H, W) bool on the grid ``size`` (nearest)."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask.bool()
    return F.interpolate(mask[:, None].float(), size=tuple(size), mode="nearest")[:, 0] > 0.5


def _valid_weights(valid: Tensor | None, like: Tensor) -> Tensor | None:
    """(B, H, W) bool -> (B, H, W) float in ``like``'s dtype, resized (nearest) to ``like``'s grid."""
    if valid is None:
        return None
    if tuple(valid.shape[-2:]) != tuple(like.shape[-2:]):
        valid = F.interpolate(valid[:, None].float(), size=like.shape[-2:], mode="nearest")[:, 0] > 0.5
    return valid.to(like.dtype)


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _global_mean(total: Tensor, count: Tensor | int, gather_distributed: bool) -> Tensor:
    """``total / count`` with the count of every process (see the module docstring).

    Args:
        total: 0-dim sum over this process's elements (carries the gradient).
        count: this process's number of elements (no gradient).
        gather_distributed: all-reduce ``count`` when a process group of more than one process is
            initialised; every process must then call this.

    Returns:
        ``W * total / sum of counts`` under DDP with ``W`` processes, else ``total / count``; 0 (not
        NaN) when there is no element anywhere.
    """
    count = torch.as_tensor(count, dtype=torch.float32, device=total.device).detach()
    world = _world_size()
    if gather_distributed and world > 1:
        count = count.clone()
        dist.all_reduce(count)
        return total * world / count.clamp_min(1.0)
    return total / count.clamp_min(1.0)


def kd_loss(
    student: Tensor,
    teacher: Tensor,
    temperature: float = 1.0,
    valid: Tensor | None = None,
    gather_distributed: bool = True,
) -> Tensor:
    """Pixel-wise knowledge distillation (Hinton et al., "Distilling the Knowledge in a Neural
    Network", 2015), applied independently at every pixel:

        KD = T² · mean over valid pixels p of  Σ_k q_t[p,k] · (log q_t[p,k] − log q_s[p,k]),
        q = softmax(logits / T) over the K classes,

    i.e. ``T² · KL(q_t ‖ q_s)`` summed over classes and averaged over valid pixels (of every process
    with ``gather_distributed``). The ``T²`` keeps the gradient scale independent of ``T``. With no
    valid pixel the loss is 0 (not NaN).

    Args:
        student: (B, K, H, W) student logits (or (N, K) rows; then ``valid`` is (N,)).
        teacher: same shape, teacher logits (no gradient flows into them).
        temperature: T > 0.
        valid: (B, H, W) bool mask of pixels that count, or None for all.
        gather_distributed: average over the valid pixels of all processes (module docstring).
    """
    if student.shape != teacher.shape:
        raise ValueError(f"kd_loss: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ")
    s, t = as_two_class(student.float()), as_two_class(teacher.detach().float())
    log_qs = F.log_softmax(s / temperature, dim=1)
    log_qt = F.log_softmax(t / temperature, dim=1)
    per_pixel = (log_qt.exp() * (log_qt - log_qs)).sum(dim=1)  # (B, H, W)
    w = _valid_weights(valid, per_pixel)
    if w is None:
        total, count = per_pixel.sum(), per_pixel.numel()
    else:
        total, count = (per_pixel * w).sum(), w.sum()
    return _global_mean(total, count, gather_distributed) * temperature**2


def cwd_loss(
    student: Tensor,
    teacher: Tensor,
    tau: float = 1.0,
    valid: Tensor | None = None,
    gather_distributed: bool = True,
) -> Tensor:
    """Channel-wise distillation (Shu et al., "Channel-wise Knowledge Distillation for Dense
    Prediction", ICCV 2021):

        CWD = τ² / (N·C) · Σ_{n,c} Σ_{i ∈ HW} p_t[n,c,i] · log(p_t[n,c,i] / p_s[n,c,i]),
        p[n,c,:] = softmax(logits[n,c,:] / τ) over the spatial positions of channel c,

    so each channel's activation map is matched as a distribution over locations (mmrazor's
    ``ChannelWiseDivergence``). The softmax is over space, so a 1-logit binary model is used as it
    is (C = 1): its two-class view ``[0, z]`` would add a constant channel, uniform in both
    distributions, that contributes 0 and halves the loss through C = 2. Ignored pixels are left out
    of the spatial softmax (they carry no probability in either distribution). ``N·C`` counts the
    images of every process with ``gather_distributed``.

    Args:
        student, teacher: (B, C, H, W) logits (or feature maps with equal channels), C >= 1.
        tau: temperature τ > 0.
        valid: (B, H, W) bool mask, or None for all pixels.
        gather_distributed: average over the images of all processes (module docstring).
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"cwd_loss: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ"
        )
    s, t = student.float(), teacher.detach().float()
    n, c = s.shape[:2]
    s = (s / tau).flatten(2)  # (N, C, HW)
    t = (t / tau).flatten(2)
    if valid is not None:
        keep = _valid_weights(valid, student).flatten(1)[:, None, :] > 0  # (N, 1, HW)
        s = s.masked_fill(~keep, float("-inf"))
        t = t.masked_fill(~keep, float("-inf"))
        has_pixel = keep.any(dim=2, keepdim=True)  # images with no valid pixel contribute 0
        s = torch.where(has_pixel, s, torch.zeros_like(s))
        t = torch.where(has_pixel, t, torch.zeros_like(t))
    log_ps = F.log_softmax(s, dim=2)
    log_pt = F.log_softmax(t, dim=2)
    pt = log_pt.exp()
    terms = pt * (log_pt - log_ps)
    if valid is not None:
        terms = torch.where(keep & has_pixel, terms, torch.zeros_like(terms))  # 0·(−inf − −inf) = NaN
    return _global_mean(terms.sum(), n * c, gather_distributed) * tau**2


def _pearson(a: Tensor, b: Tensor, dim: int, eps: float = 1e-8) -> Tensor:
    """Pearson correlation of ``a`` and ``b`` along ``dim`` (cosine of the centred vectors)."""
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    return F.cosine_similarity(a, b, dim=dim, eps=eps)


def dist_loss(
    student: Tensor,
    teacher: Tensor,
    tau: float = 1.0,
    beta: float = 1.0,
    gamma: float = 1.0,
    valid: Tensor | None = None,
    tau_squared: bool = True,
    return_terms: bool = False,
    gather_distributed: bool = True,
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """DIST (Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022) for
    dense prediction: class probabilities ``y = softmax(logits / τ)`` at every valid pixel, then

        inter = 1 − mean over pixels p of ρ(y_s[p, :], y_t[p, :])      (relations between classes)
        intra = 1 − mean over classes c of ρ(y_s[:, c], y_t[:, c])     (relations between pixels)
        DIST  = (τ² if tau_squared) · (β · inter + γ · intra),

    ρ being the Pearson correlation. The inter-class term is a mean over pixels: with
    ``gather_distributed`` it runs over the valid pixels of every process. The intra-class term is a
    **per-batch statistic**: each ρ(y_s[:, c], y_t[:, c]) is taken across the valid pixels of this
    process's batch, so under DDP the loss is the mean over processes of each one's intra-class
    term, and 2 processes x B differ from 1 x 2B (not synchronised); with fewer than 2 valid pixels
    it is 0. Matching correlations instead of exact probabilities tolerates the scale and shift gap
    of a much stronger teacher. With two classes (binary models) the inter-class term is degenerate:
    two centred 2-vectors are always (anti-)parallel, so ρ = ±1 and the term has no gradient;
    ``distill/run.py`` then sets β = 0 and says so.

    Args:
        student, teacher: (B, K, H, W) logits.
        tau: temperature.
        beta, gamma: weights of the inter- and intra-class terms.
        valid: (B, H, W) bool mask, or None for all pixels.
        tau_squared: multiply by τ² as the paper's code does (off gives the bare correlations).
        return_terms: also return (inter, intra) unweighted.
        gather_distributed: the inter-class mean over the valid pixels of all processes (module
            docstring); the intra-class term stays per process either way.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"dist_loss: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ"
        )
    s, t = as_two_class(student.float()), as_two_class(teacher.detach().float())
    k = s.shape[1]
    ys = F.softmax(s / tau, dim=1).permute(0, 2, 3, 1).reshape(-1, k)  # (P, K)
    yt = F.softmax(t / tau, dim=1).permute(0, 2, 3, 1).reshape(-1, k)
    if valid is not None:
        keep = _valid_weights(valid, student).reshape(-1) > 0
        ys, yt = ys[keep], yt[keep]
    pixels = ys.shape[0]
    zero = s.sum() * 0.0
    inter_sum = (1.0 - _pearson(ys, yt, dim=1)).sum() if pixels else zero
    inter = _global_mean(inter_sum, pixels, gather_distributed)  # every process, even with no pixel
    # no (or one) valid pixel: no correlation across pixels to match
    intra = 1.0 - _pearson(ys, yt, dim=0).mean() if pixels >= 2 else zero
    scale = tau**2 if tau_squared else 1.0
    total = scale * (beta * inter + gamma * intra)
    return (total, inter, intra) if return_terms else total


def match_stages(
    student_reductions: Sequence[int], teacher_reductions: Sequence[int], student_stages: Sequence[int]
) -> list[tuple[int, int]]:
    """Pair each chosen student stage with the teacher stage of the nearest stride (log scale).

    Returns:
        ``[(student_stage, teacher_stage), ...]``.
    """
    import math

    pairs = []
    n = len(student_reductions)
    for s in student_stages:
        if not -n <= s < n:
            raise ValueError(f"student stage {s} out of range: the student encoder has {n} stages")
        s = s % n
        r = math.log(student_reductions[s])
        t = min(range(len(teacher_reductions)), key=lambda j: (abs(math.log(teacher_reductions[j]) - r), -j))
        pairs.append((s, t))
    return pairs


class FeatureDistiller(nn.Module):
    """Feature distillation for heterogeneous teacher/student pairs (e.g. a Transformer teacher and a
    CNN student with other channel counts and strides), in the spirit of FitNets (Romero et al., 2015)
    with PKD-style normalisation (Cao et al., "PKD: General Distillation Framework for Object
    Detectors via Pearson Correlation Coefficient", NeurIPS 2022):

        L = mean over pairs (s, t) of  MSE( norm(A_s(F_s)), norm(resize(F_t → stride of F_s)) ),

    where ``A_s`` is a 1×1 convolution from the student's channels to the teacher's, trained with the
    student (and dropped at export), ``resize`` is bilinear, and ``norm`` is either the identity or a
    per-image, per-channel standardisation over space (``"channel"``: zero mean, unit variance), which
    removes the scale gap between architectures.

    Args:
        student_channels, student_reductions: the student encoder's contract.
        teacher_channels, teacher_reductions: the teacher encoder's contract.
        pairs: ``[(student_stage, teacher_stage)]`` (see :func:`match_stages`).
        norm: ``"channel"`` or ``"none"``. A ``"channel"`` standardisation of a 1×1 map (e.g. a
            32-px crop at a stride-32 stage) is all zeros, which would make the term silently 0
            with no gradient: :meth:`loss` raises a ``ValueError`` instead.
        gather_distributed: the MSE's mean runs over the elements of every process (see the
            module docstring).
    """

    def __init__(
        self,
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        pairs: Sequence[tuple[int, int]],
        norm: Literal["channel", "none"] = "channel",
        gather_distributed: bool = True,
    ) -> None:
        super().__init__()
        if norm not in ("channel", "none"):
            raise ValueError(f"feature norm must be 'channel' or 'none', got {norm!r}")
        self.pairs = [(int(s), int(t)) for s, t in pairs]
        self.norm = norm
        self.gather_distributed = gather_distributed
        self.adapters = nn.ModuleList(
            nn.Conv2d(student_channels[s], teacher_channels[t], kernel_size=1) for s, t in self.pairs
        )

    def adapt(self, student_feats: Sequence[Tensor]) -> list[Tensor]:
        """Project the paired student stages to the teacher's channels: list of (B, C_t, h_s, w_s)."""
        return [adapter(student_feats[s]) for adapter, (s, _) in zip(self.adapters, self.pairs)]

    def _normalise(self, x: Tensor) -> Tensor:
        if self.norm == "none":
            return x
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = x.var(dim=(2, 3), keepdim=True, unbiased=False).add(1e-6).sqrt()
        return (x - mean) / std

    def loss(
        self, adapted: Sequence[Tensor], teacher_feats: Sequence[Tensor], valid: Tensor | None = None
    ) -> Tensor:
        """MSE between adapted student features and resized teacher features, averaged over pairs.

        Args:
            adapted: output of :meth:`adapt` (computed inside the student's forward pass), each
                (B, C_t, h_s, w_s).
            teacher_feats: the teacher encoder's feature list, each (B, C_t, h_t, w_t).
            valid: unused (features have no label grid); kept for a uniform signature.

        Raises:
            ValueError: with ``norm="channel"``, when a paired student map is 1×1 (its per-channel
                standardisation would be identically 0: no loss, no gradient).
        """
        del valid
        total = adapted[0].new_zeros((), dtype=torch.float32)
        for a, (s, t) in zip(adapted, self.pairs):
            if self.norm == "channel" and a.shape[-2] * a.shape[-1] == 1:
                raise ValueError(
                    f"feature distillation: student stage {s} gives a 1x1 map at this input size, and "
                    "kd.feature_norm=channel standardises each channel over its positions, which for one "
                    "position is identically 0 (loss 0, no gradient). Use a larger data.image_size, "
                    "earlier stages in kd.feature_stages (e.g. [-2]) or kd.feature_norm=none"
                )
            target = teacher_feats[t].detach().float()
            if tuple(target.shape[-2:]) != tuple(a.shape[-2:]):
                target = F.interpolate(target, size=a.shape[-2:], mode="bilinear", align_corners=False)
            squared = (self._normalise(a.float()) - self._normalise(target)).square()  # (B, C_t, h, w)
            total = total + _global_mean(squared.sum(), squared.numel(), self.gather_distributed)
        return total / max(len(self.pairs), 1)


class DistillOutput:
    """Result of :class:`DistillCriterion`: the total to back-propagate, every term for logging, and
    statistics that are not losses (``confident_fraction`` with ``kd.confidence_threshold > 0``)."""

    __slots__ = ("total", "terms", "stats")

    def __init__(
        self, total: Tensor, terms: dict[str, Tensor], stats: dict[str, Tensor] | None = None
    ) -> None:
        self.total = total
        self.terms = terms
        self.stats = stats or {}


class DistillCriterion(nn.Module):
    """``total = task_weight · task + Σ_k weight_k · term_k`` over the active distillation terms.

    Args:
        task: the fine-tuning loss (``CombinedLoss``: logits, target -> ``LossOutput``), applied to
            labelled pixels only (unlabelled samples carry ``ignore_index`` everywhere).
        kd: the ``kd`` config section (:class:`distill.config.KDConfig`): task weight, term
            weights, temperature, CWD's τ, DIST's τ / β / γ / τ², the grid logits are compared on.
        ignore_index: label value excluded from the task loss and from the distillation terms.
        feature_loss: ``(student_adapted, teacher_feats) -> Tensor`` when ``feature`` is active,
            normally :meth:`FeatureDistiller.loss` of the distiller that lives in the student wrapper
            (its adapters train with the student; the criterion holds no parameters).
        gather_distributed: KD, CWD and DIST's inter-class term average over the pixels (images) of
            every process; DIST's intra-class term is per process (see the module docstring).

    Self-training (Noisy Student, Xie et al. 2020; FixMatch, Sohn et al. 2020):

    * ``kd.confidence_threshold > 0``: on **unlabelled** samples, pixels where the teacher's largest
      class probability (:func:`confident_pixels`) is below the threshold leave the ``kd`` and
      ``dist`` terms, numerator and normaliser alike (KD then averages over the confident pixels).
      Labelled samples keep every valid pixel: their ground truth already drives the task loss, and
      the teacher, trained on them, is rarely unsure there. ``cwd`` is left unmasked: its softmax
      runs over space per channel, where one pixel's class confidence does not say whether the
      channel's spatial distribution is trustworthy. ``confident_fraction`` (in :attr:`DistillOutput.stats`)
      is the share of the distilled pixels the mask kept.
    * ``kept`` (the strong augmentation's cutout, :mod:`distill.augment`): erased pixels leave the
      task loss and every logit term: the teacher saw them, the student did not.
    """

    def __init__(
        self,
        task: nn.Module,
        kd: KDConfig,
        ignore_index: int = 255,
        feature_loss: Callable[[Sequence[Tensor], Sequence[Tensor]], Tensor] | None = None,
        gather_distributed: bool = True,
    ) -> None:
        super().__init__()
        weights = kd.active()
        if weights.get("feature", 0) > 0 and feature_loss is None:
            raise ValueError("the feature term needs a feature_loss (FeatureDistiller.loss)")
        self.task = task
        self.task_weight = float(kd.task_weight)
        self.weights = weights
        self.ignore_index = ignore_index
        self.temperature, self.cwd_tau = kd.temperature, kd.cwd_tau
        self.dist_tau, self.dist_beta, self.dist_gamma = kd.dist_tau, kd.dist_beta, kd.dist_gamma
        self.dist_tau_squared = kd.dist_tau_squared
        self.resize_to = kd.resize_to
        self.confidence_threshold = float(kd.confidence_threshold)
        self.feature_loss = feature_loss
        self.gather_distributed = gather_distributed

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | None,
        target: Tensor,
        labelled: Tensor | None = None,
        student_adapted: Sequence[Tensor] = (),
        teacher_feats: Sequence[Tensor] = (),
        kept: Tensor | None = None,
    ) -> DistillOutput:
        """Args:
        student_logits: (B, K, Hs, Ws); teacher_logits: (B, K, Ht, Wt) (None when no logit term is on).
        target: (B, H, W) labels (``ignore_index`` where unknown).
        labelled: (B,) bool, False for unlabelled images (every pixel then counts for the KD terms).
        student_adapted: the student's adapted features (:meth:`FeatureDistiller.adapt`).
        teacher_feats: the teacher encoder's features.
        kept: (B, H', W') bool, False where the student's input was erased (excluded everywhere);
            None: every pixel.
        """
        terms: dict[str, Tensor] = {}
        stats: dict[str, Tensor] = {}
        total = student_logits.new_zeros((), dtype=torch.float32)
        if kept is not None:
            kept = _resize_mask(kept, tuple(target.shape[-2:]))
            target = target.masked_fill(~kept, self.ignore_index)
        if self.task_weight > 0:
            task = self.task(student_logits, target)
            terms["task"] = task.total
            terms.update({f"task_{k}": v for k, v in task.terms.items()})
            total = total + self.task_weight * task.total
        logit_terms = [k for k in self.weights if k != "feature"]
        if logit_terms:
            size = tuple(target.shape[-2:]) if self.resize_to == "label" else None
            s, t = align_logits(student_logits, teacher_logits, size=size, to=self.resize_to)
            valid = target != self.ignore_index
            if labelled is not None:
                valid = valid | ~labelled.bool().view(-1, 1, 1)
            if kept is not None:  # unlabelled rows too: erased pixels leave every term
                valid = valid & kept
            if tuple(valid.shape[-2:]) != tuple(s.shape[-2:]):
                valid = _valid_weights(valid, s) > 0
            pixel_valid = valid  # kd and dist: valid pixels the teacher is confident about
            if self.confidence_threshold > 0:
                sure = confident_pixels(t, self.confidence_threshold)
                if labelled is not None:
                    sure = sure | labelled.bool().view(-1, 1, 1)  # only unlabelled samples are masked
                else:  # every sample is labelled: nothing to mask
                    sure = torch.ones_like(sure)
                pixel_valid = valid & sure
                stats["confident_fraction"] = pixel_valid.sum() / valid.sum().clamp_min(1)
            gather = self.gather_distributed
            for name in logit_terms:
                if name == "kd":
                    value = kd_loss(s, t, self.temperature, pixel_valid, gather)
                elif name == "cwd":
                    value = cwd_loss(s, t, self.cwd_tau, valid, gather)
                else:
                    value = dist_loss(
                        s,
                        t,
                        self.dist_tau,
                        self.dist_beta,
                        self.dist_gamma,
                        pixel_valid,
                        self.dist_tau_squared,
                        gather_distributed=gather,
                    )
                terms[name] = value
                total = total + self.weights[name] * value
        if "feature" in self.weights:
            value = self.feature_loss(student_adapted, teacher_feats)
            terms["feature"] = value
            total = total + self.weights["feature"] * value
        return DistillOutput(total, terms, stats)
