"""Training targets from label maps: LabelPooling soft targets, one-hot / smoothed class targets,
CutMix with localized labels, and per-cell local targets. All tensors are torch; classes on dim 1.

CutMix with localized labels. Image A (crop box ``box_A``) receives the rectangle R of image B =
A's batch neighbour under a random permutation (R in output pixels of the S x S crops, as CutMix
draws it); ``lam`` = 1 - area(R) / S^2 is the fraction of A that stays visible. The target is

    lam * softmax(mean of A's map over A's visible region) + (1 - lam) * softmax(pool(B's map, R_B))

where R_B is R mapped into B's image frame through B's crop box (and mirrored when B was flipped),
so B contributes the labels of the pixels it really shows. A's visible region (its crop minus R)
is not a box: it is cut into the (at most 4) boxes above, below, left and right of R, each pooled
with LabelPooling and averaged with its area as weight, which is the mean of A's label map over
the visible region exactly, up to RoIAlign's own discretisation (a fixed number of sampling points
per box, boxes under one map cell stretched to one cell, as ``aligned=False`` does). Mixing is done
after the softmax of each region, with the visible areas as weights. The official ReLabel code
(and timm-style CutMix) mixes by area only: ``lam * target_A + (1 - lam) * target_B`` with each
target pooled over the WHOLE crop of its image, so a pasted patch of a dog's background still
carries "dog" and the covered object of A still counts. Label modes that use the folder classes mix
their one-hot (or smoothed) targets by area as usual.

Local targets (``local_labels = S``): the student's classifier, applied as a 1x1 convolution on
its pre-pool feature map (timm ``forward_features``, adaptive-average-pooled to S x S), predicts
each of S x S cells; each cell's target is ``softmax(label_pooling(..., output_size=S))`` (mirrored
along x for flipped crops; under CutMix, each cell mixes A's and B's cell targets by the fraction
of the cell the patch covers). The loss adds ``local_weight`` times their soft cross-entropy.

Every soft target is :func:`teacher_target` of pooled scores: with ``classes`` (a student for N of
the teacher's C classes) the pooled scores of those N classes are kept, in the student's output
order, and the others dropped BEFORE the softmax (the N-way target is the teacher's distribution
conditioned on the N classes); with ``temperature`` T the softmax is taken of scores / T (T = 1,
the default, is the official target; T < 1 sharpens the targets of a teacher with small logits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from trt_relabel.pooling import label_pooling, pooled_entries, soft_target


def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean over samples (and cells) of -sum_c target * log_softmax(logits): logits and target
    [B, C] or [B, C, S, S] (classes on dim 1)."""
    return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()


def class_targets(labels: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """int64 [B] -> float32 [B, C]: one-hot, with label smoothing (1 - e on the class, e / C
    added everywhere)."""
    return F.one_hot(labels, num_classes).float() * (1.0 - smoothing) + smoothing / num_classes


def teacher_target(pooled: Tensor, classes: Tensor | None = None, temperature: float = 1.0) -> Tensor:
    """Soft target of pooled teacher scores [B, C] or [B, C, S, S]: softmax over dim 1 of the
    scores of `classes` (int64 [N], the teacher class of each student output; None: all C, in
    order) divided by `temperature` -> [B, N] or [B, N, S, S]. T = 1 is exactly
    :func:`trt_relabel.pooling.soft_target` of the pooled scores."""
    if classes is not None:
        pooled = pooled.index_select(1, classes.to(pooled.device))
    return soft_target(pooled if temperature == 1.0 else pooled / temperature)


def relabel_targets(
    values: Tensor,
    indices: Tensor,
    boxes: Tensor,
    num_classes: int,
    *,
    classes: Tensor | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """LabelPooling soft targets: values float [B, k, h, w], indices int [B, k, h, w], boxes
    [B, 4] (x1, y1, x2, y2 in [0, 1] of the image frame), the teacher's C = `num_classes` ->
    float32 [B, N] (see :func:`teacher_target` for `classes` and `temperature`)."""
    return teacher_target(label_pooling(values, indices, boxes, num_classes), classes, temperature)


def crop_to_image(rects: Tensor, boxes: Tensor, flipped: Tensor) -> Tensor:
    """Rectangles given as fractions (u1, v1, u2, v2) of the OUTPUT crop (after the flip) ->
    boxes (x1, y1, x2, y2) normalised in the image frame. rects [..., B, 4], boxes [B, 4],
    flipped bool [B]; a flipped crop mirrors u (u -> 1 - u)."""
    u1, v1, u2, v2 = rects.unbind(-1)
    u1, u2 = torch.where(flipped, 1 - u2, u1), torch.where(flipped, 1 - u1, u2)
    x1, y1, x2, y2 = boxes.unbind(-1)
    width, height = x2 - x1, y2 - y1
    return torch.stack([x1 + u1 * width, y1 + v1 * height, x1 + u2 * width, y1 + v2 * height], -1)


@dataclass(frozen=True)
class CutMix:
    """One CutMix draw for a batch: image i receives the pixels [y1:y2, x1:x2] of image perm[i]
    (output pixels of the S x S crops; x2, y2 exclusive)."""

    perm: Tensor  # int64 [B]
    rect: tuple[int, int, int, int]  # x1, y1, x2, y2
    size: int  # S

    @property
    def kept(self) -> float:
        """lam: the fraction of each image that stays visible."""
        x1, y1, x2, y2 = self.rect
        return 1.0 - (x2 - x1) * (y2 - y1) / self.size**2

    @property
    def fractions(self) -> tuple[float, float, float, float]:
        """The rectangle as fractions (u1, v1, u2, v2) of the crop."""
        return tuple(c / self.size for c in self.rect)

    def paste(self, images: Tensor) -> Tensor:
        """Paste the rectangle of image perm[i] into image i of `images` [B, 3, S, S], in place
        (the pasted pixels are read before any is written); returns `images`."""
        x1, y1, x2, y2 = self.rect
        images[:, :, y1:y2, x1:x2] = images[self.perm, :, y1:y2, x1:x2]
        return images

    def mix(self, targets: Tensor) -> Tensor:
        """Area mix of per-image targets [B, C]: lam * t + (1 - lam) * t[perm]."""
        return self.kept * targets + (1.0 - self.kept) * targets[self.perm]

    def cell_coverage(self, cells: int, device: torch.device | None = None) -> Tensor:
        """float32 [cells, cells]: the fraction of each cell of an even cells x cells grid over
        the crop that the rectangle covers."""
        u1, v1, u2, v2 = self.fractions
        edges = torch.arange(cells + 1, dtype=torch.float32, device=device) / cells
        cover_x = (edges[1:].clamp(max=u2) - edges[:-1].clamp(min=u1)).clamp(min=0)
        cover_y = (edges[1:].clamp(max=v2) - edges[:-1].clamp(min=v1)).clamp(min=0)
        return cover_y[:, None] * cover_x[None, :] * cells**2


def sample_cutmix(batch_size: int, image_size: int, beta: float) -> CutMix:
    """CutMix's draw (torch's CPU RNG): lam ~ Beta(beta, beta), a rectangle of side
    S * sqrt(1 - lam) centred uniformly and clipped to the crop, a random permutation of the
    batch."""
    lam = float(torch.distributions.Beta(beta, beta).sample())
    cut = int(image_size * math.sqrt(1.0 - lam)) // 2
    cx, cy = (int(c) for c in torch.randint(image_size, (2,)))
    x1, x2 = max(cx - cut, 0), min(cx + cut, image_size)
    y1, y2 = max(cy - cut, 0), min(cy + cut, image_size)
    return CutMix(torch.randperm(batch_size), (x1, y1, x2, y2), image_size)


def cutmix_relabel_targets(
    values: Tensor,
    indices: Tensor,
    boxes: Tensor,
    flipped: Tensor,
    cutmix: CutMix,
    num_classes: int,
    *,
    classes: Tensor | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """Localized ReLabel targets of a CutMix batch (see the module docstring) -> float32 [B, N].

    values float [B, k, h, w], indices int [B, k, h, w], boxes [B, 4] image-frame crop boxes,
    flipped bool [B]. A's visible region = the 4 boxes around the rectangle (top and bottom bands
    over the full width, left and right pieces beside it), pooled and averaged by area.
    """
    u1, v1, u2, v2 = cutmix.fractions
    pieces = boxes.new_tensor([[0, 0, 1, v1], [0, v2, 1, 1], [0, v1, u1, v2], [u2, v1, 1, v2]])
    areas = boxes.new_tensor([v1, 1 - v2, u1 * (v2 - v1), (1 - u2) * (v2 - v1)])
    batch = boxes.shape[0]
    perm = cutmix.perm
    visible_boxes = crop_to_image(pieces[:, None, :].expand(4, batch, 4), boxes, flipped)  # [4, B, 4]
    patch_boxes = crop_to_image(boxes.new_tensor(cutmix.fractions), boxes[perm], flipped[perm])  # [B, 4]
    pooled = label_pooling(
        torch.cat([values.repeat(4, 1, 1, 1), values[perm]]),
        torch.cat([indices.repeat(4, 1, 1, 1), indices[perm]]),
        torch.cat([visible_boxes.reshape(4 * batch, 4), patch_boxes]),
        num_classes,
    )
    kept = cutmix.kept
    visible = (pooled[: 4 * batch].view(4, batch, -1) * areas[:, None, None]).sum(0) / max(kept, 1e-6)
    patch = pooled[4 * batch :]
    return kept * teacher_target(visible, classes, temperature) + (1.0 - kept) * teacher_target(
        patch, classes, temperature
    )


@dataclass(frozen=True)
class CellTargets:
    """Per-cell soft targets t [B, C, S, S] held sparsely (a cell's classes outside the top-k of the
    map cells it covers all share one value): t[b, c, i, j] = base[b, i, j] + the sum of
    weights[b, e, i, j] over the entries e with classes[b, e, i, j] == c (entries of weight 0
    may hold any class)."""

    base: Tensor  # float32 [B, S, S]
    classes: Tensor  # int64 [B, E, S, S]
    weights: Tensor  # float32 [B, E, S, S]
    num_classes: int

    def dense(self) -> Tensor:
        """The targets as one float32 tensor [B, C, S, S]."""
        targets = self.base[:, None].repeat(1, self.num_classes, 1, 1)
        return targets.scatter_add_(1, self.classes, self.weights)

    def cross_entropy(self, logits: Tensor) -> Tensor:
        """soft_cross_entropy(logits, self.dense()) without the dense targets: the mean over
        samples and cells of -sum_c t * log_softmax(logits), logits float [B, C, S, S]."""
        log_probs = F.log_softmax(logits, dim=1)
        entries = (self.weights * log_probs.gather(1, self.classes)).sum(1)
        return -(self.base * log_probs.sum(1) + entries).mean()

    def record_stream(self, stream: torch.cuda.Stream) -> None:
        """Tensor.record_stream of each tensor: they are used on `stream` too."""
        for tensor in (self.base, self.classes, self.weights):
            tensor.record_stream(stream)

    def mix(self, cover: Tensor, perm: Tensor) -> CellTargets:
        """(1 - cover) * self + cover * self[perm]: cover [S, S] (or [B, S, S]) in [0, 1], perm
        int64 [B]."""
        keep = 1.0 - cover
        return CellTargets(
            keep * self.base + cover * self.base[perm],
            torch.cat([self.classes, self.classes[perm]], 1),
            torch.cat([keep * self.weights, cover * self.weights[perm]], 1),
            self.num_classes,
        )


def local_targets(
    values: Tensor,
    indices: Tensor,
    boxes: Tensor,
    flipped: Tensor,
    num_classes: int,
    cells: int,
    cutmix: CutMix | None = None,
    *,
    classes: Tensor | None = None,
    temperature: float = 1.0,
) -> CellTargets:
    """Per-cell soft targets of the S x S cells of each output crop: softmax over classes of
    label_pooling(..., output_size=S) (as :func:`teacher_target`: the scores of `classes`, divided
    by `temperature`), its column bins mirrored where the crop was flipped; under CutMix each cell
    mixes its own and its pasted neighbour's target by the fraction of the cell the rectangle
    covers. Computed from the pooled entries of each cell (a few dozen), never over all C classes;
    N = len(classes) (C without)."""
    entry_classes, scores = pooled_entries(values, indices, boxes, num_classes, cells, flipped=flipped)
    entry_classes, scores, outputs = _student_entries(entry_classes, scores, num_classes, classes, temperature)
    base, entry_classes, weights = sparse_softmax(entry_classes, scores, outputs)  # [B, S * S], [B, S * S, E]
    batch = len(base)
    targets = CellTargets(
        base.view(batch, cells, cells),
        entry_classes.view(batch, cells, cells, -1).permute(0, 3, 1, 2),
        weights.view(batch, cells, cells, -1).permute(0, 3, 1, 2),
        outputs,
    )
    if cutmix is None:
        return targets
    return targets.mix(cutmix.cell_coverage(cells, base.device), cutmix.perm)


def _student_entries(
    entry_classes: Tensor, scores: Tensor, num_classes: int, classes: Tensor | None, temperature: float
) -> tuple[Tensor, Tensor, int]:
    """Pooled entries (teacher classes int64 [..., E], scores [..., E]) as entries of the student's
    N outputs: class -> its output (N, i.e. none, for a class the student lacks), scores /
    temperature. Returns (classes, scores, N)."""
    if classes is not None:
        lookup = torch.full((num_classes,), len(classes), dtype=torch.int64, device=entry_classes.device)
        lookup[classes.to(entry_classes.device)] = torch.arange(len(classes), device=entry_classes.device)
        entry_classes, num_classes = lookup[entry_classes], len(classes)
    return entry_classes, scores if temperature == 1.0 else scores / temperature, num_classes


def sparse_softmax(classes: Tensor, scores: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax over C classes of vectors given as entries (classes int64 [..., E], scores [..., E]:
    vector[c] = the sum of the scores of the entries of class c, 0 for classes without one) ->
    (base [...], classes int64 [..., E], weights [..., E]): softmax[c] = base + the weights of
    the entries of class c. Each class keeps one entry (the others weigh 0). The softmax of the
    dense vectors (whose entries are added in the order of E), up to rounding."""
    classes = classes.masked_fill(scores == 0, num_classes)  # adds nothing: as an absent class
    classes, order = classes.sort(dim=-1, stable=True)
    scores = scores.gather(-1, order)
    first = torch.ones_like(classes, dtype=torch.bool)  # the first entry of each class
    first[..., 1:] = classes[..., 1:] != classes[..., :-1]
    group = first.cumsum(-1) - 1
    pooled = torch.zeros_like(scores).scatter_add_(-1, group, scores).gather(-1, group)  # its class's sum
    kept = first & (classes < num_classes)
    absent = num_classes - kept.sum(-1)  # classes at 0
    peak = pooled.masked_fill(~kept, -math.inf).amax(-1)
    shift = torch.where(absent > 0, peak.clamp(min=0), peak)  # the largest of all C
    exp = (pooled - shift[..., None]).exp_().masked_fill_(~kept, 0)
    rest = (-shift).exp_()
    total = exp.sum(-1) + absent * rest
    base = rest / total
    weights = (exp / total[..., None] - base[..., None]).masked_fill_(~kept, 0)
    return base, classes.masked_fill(~kept, 0), weights
