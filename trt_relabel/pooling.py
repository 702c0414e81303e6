"""LabelPooling: RoIAlign of a sparse top-k label map over a crop box, without building the dense map.

ReLabel (Yun et al., CVPR 2021) stores, per image, the top-k classes of a teacher's label map
[C, h, w] and trains on ``softmax(roi_align(dense_map, crop_box))``. :func:`label_pooling` gives
exactly that RoIAlign, computed from the top-k entries alone: RoIAlign is separable, so each box
becomes a per-bin weight over the map's rows and one over its columns (roi_align's sampling
rules, computed in closed form); every top-k entry of the band of cells that weigh in a bin is
multiplied by the weight of its cell and added into its class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

BOX_ORDERS = ("xyxy", "reference")


def label_pooling(
    values: Tensor,
    indices: Tensor,
    boxes: Tensor,
    num_classes: int,
    output_size: int | tuple[int, int] = 1,
    box_order: str = "xyxy",
    flipped: Tensor | None = None,
) -> Tensor:
    """Pool a top-k label map over one box per image, exactly as RoIAlign on the dense map.

    The result equals ``torchvision.ops.roi_align(dense, rois, output_size, spatial_scale=1,
    sampling_ratio=-1, aligned=False)``, where ``dense`` [B, num_classes, h, w] holds ``values``
    at ``indices`` and zeros elsewhere, and ``rois`` are the boxes in the map's cell frame (see
    ``box_order``), both in the compute dtype. The dense map is never built: the work grows with
    B * k * sh * sw * (the map cells one output bin reaches), not with num_classes * h * w.

    Args:
        values (Tensor[B, k, h, w], any float dtype): top-k scores (logits) of every map cell.
            Computed in float64 if float64, else in float32. Gradients flow to ``values``.
        indices (Tensor[B, k, h, w], int16, int32, int64 or uint8): the class of each score, in
            ``[0, num_classes)``, on the device of ``values``. A cell's k classes are distinct (as
            from ``topk``); a repeated class would add up instead of overwriting.
        boxes (Tensor[B, 4], float): one box per image as (x1, y1, x2, y2), normalised to [0, 1]
            in the image frame: x to the right (0 = left edge, 1 = right edge), y downwards
            (0 = top, 1 = bottom). Boxes reaching outside the image follow roi_align's rules too.
            Moved to the device of ``values``; no gradient flows to them (as in roi_align).
        num_classes (int): C, the number of classes.
        output_size (int or Tuple[int, int]): the pooled size (sh, sw) of each box; an int s
            means (s, s).
        box_order (str): how a box becomes a RoI in the cell frame (cell (i, j) is centred at
            x = j, y = i):

            - ``"xyxy"``: the correct axes, ``(x1 * w - 0.5, y1 * h - 0.5, x2 * w - 0.5, y2 * h - 0.5)``.
            - ``"reference"``: the official ReLabel code (naver-ai/relabel_imagenet,
              ``utils/data_loader.py`` and ``get_relabel`` in ``utils/relabel_functions.py``),
              which passes the crop as (y1, x1, y2, x2), all scaled by the map width, where
              roi_align reads (x1, y1, x2, y2):
              ``(y1 * w - 0.5, x1 * w - 0.5, y2 * w - 0.5, x2 * w - 0.5)``. It pools the crop
              mirrored about the diagonal; use it only to reproduce the official targets.
        flipped (Tensor[B], bool, optional): boxes whose output bins are mirrored along x (bin
            column j holds what column sw - 1 - j would), as the targets of a horizontally flipped
            crop: ``label_pooling(..., flipped=f)`` equals the unflipped result with
            ``.flip(-1)`` applied to the rows where ``f`` (unchanged for output size 1), at no
            extra cost.

    Returns:
        Tensor[B, C] float32 (float64 for float64 ``values``): the pooled scores, before
        softmax, if ``output_size`` is the int 1; otherwise Tensor[B, C, sh, sw] (in
        ``torch.channels_last`` memory format).
    """
    out_h, out_w = _check_output_size(output_size)
    if out_h * out_w == 1:
        _check_inputs(values, indices, boxes, num_classes, box_order, flipped)  # (a flip changes no one bin)
        pooled = _pool_one_bin(values, indices, boxes, num_classes, box_order)
    else:
        classes, scores = pooled_entries(values, indices, boxes, num_classes, output_size, box_order, flipped)
        pooled = scores.new_zeros(*classes.shape[:2], num_classes).scatter_add_(2, classes, scores)
    if output_size == 1:
        return pooled.view(len(pooled), num_classes)
    return pooled.permute(0, 2, 1).unflatten(2, (out_h, out_w))


def _pool_one_bin(values: Tensor, indices: Tensor, boxes: Tensor, num_classes: int, box_order: str) -> Tensor:
    """label_pooling with one output bin -> [B, 1, C]: every cell's weight in the bin [B, 1, h * w],
    then one scatter per rank. (The training targets' path: with one bin, a band of cells saves
    little, and its gathers cost ~5x the whole call; per-rank scatters keep the temporaries
    small.)"""
    dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
    batch, ranks, height, width = values.shape
    weight_y, weight_x = _bin_axis_weights(boxes.detach().to(values.device, dtype), height, width, 1, 1, box_order)
    cell_weights = (weight_y[:, :, :, None] * weight_x[:, :, None, :]).view(batch, 1, height * width)
    pooled = values.new_zeros(batch, 1, num_classes, dtype=dtype)
    rank_values = values.to(dtype).reshape(batch, ranks, 1, -1).unbind(1)
    rank_indices = indices.to(torch.int64).reshape(batch, ranks, 1, -1).unbind(1)
    for scores, classes in zip(rank_values, rank_indices, strict=True):
        pooled.scatter_add_(2, classes, scores * cell_weights)
    return pooled


def pooled_entries(
    values: Tensor,
    indices: Tensor,
    boxes: Tensor,
    num_classes: int,
    output_size: int | tuple[int, int] = 1,
    box_order: str = "xyxy",
    flipped: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The terms that :func:`label_pooling` adds up, per output bin: each top-k score of a map cell
    that weighs in the bin, times its weight.

    Arguments as for :func:`label_pooling`. Returns (classes int64 [B, sh * sw, E], scores
    [B, sh * sw, E] in the compute dtype), bins in row-major order: ``label_pooling(...)`` of bin
    n and class c is the sum, in the order of e, of ``scores[:, n, e]`` over the entries e with
    ``classes[:, n, e] == c``. E = k * (the cells of the widest band of weighted cells of any bin),
    so a small bin has few entries; entries of cells that weigh nothing in a bin have score 0.
    """
    _check_inputs(values, indices, boxes, num_classes, box_order, flipped)
    out_h, out_w = _check_output_size(output_size)
    dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
    batch, ranks, height, width = values.shape
    boxes = boxes.detach().to(values.device, dtype)
    if flipped is not None:
        flipped = flipped.to(values.device)
    cells, weights = _bin_cells(boxes, height, width, out_h, out_w, box_order, flipped)  # [B, bins, L]
    # Entries of a bin run over the ranks, then the band's rows, then its columns.
    rank_offsets = torch.arange(0, ranks * height * width, height * width, device=values.device)
    flat = (cells[:, :, None, :] + rank_offsets[:, None]).view(batch, -1)  # [B, bins * k * L]
    scores = values.to(dtype).reshape(batch, -1).gather(1, flat).view(*cells.shape[:2], ranks, -1)
    classes = indices.reshape(batch, -1).gather(1, flat).view(batch, out_h * out_w, -1).to(torch.int64)
    return classes, (scores * weights[:, :, None, :]).view_as(classes)


def soft_target(pooled: Tensor) -> Tensor:
    """Softmax of pooled scores over the classes (dim 1): the ReLabel soft target.

    Classes outside every cell's top-k pooled to 0 and take part in the softmax, as in the
    official code.

    Args:
        pooled (Tensor[B, C] or Tensor[B, C, sh, sw], float): output of :func:`label_pooling`.

    Returns:
        Tensor of the same shape and dtype whose entries along dim 1 sum to 1.
    """
    return torch.softmax(pooled, dim=1)


def _check_inputs(
    values: Tensor,
    indices: Tensor,
    boxes: Tensor,
    num_classes: int,
    box_order: str,
    flipped: Tensor | None,
) -> None:
    """Raise ValueError for unusable arguments (but the output size)."""
    if values.dim() != 4 or not values.is_floating_point() or 0 in values.shape:
        raise ValueError(
            f"values must be a non-empty float tensor [B, k, h, w], got {values.dtype} {tuple(values.shape)}"
        )
    if indices.shape != values.shape or indices.is_floating_point() or indices.is_complex():
        raise ValueError(
            f"indices must be an integer tensor of the shape of values {tuple(values.shape)}, "
            f"got {indices.dtype} {tuple(indices.shape)}"
        )
    if indices.dtype == torch.bool or indices.device != values.device:
        raise ValueError(f"indices must be integers on {values.device}, got {indices.dtype} on {indices.device}")
    if boxes.shape != (values.shape[0], 4):
        raise ValueError(f"boxes must be [B, 4] = [{values.shape[0]}, 4], got {tuple(boxes.shape)}")
    if flipped is not None and (flipped.shape != (values.shape[0],) or flipped.dtype != torch.bool):
        raise ValueError(
            f"flipped must be a bool tensor [B] = [{values.shape[0]}], got {flipped.dtype} {tuple(flipped.shape)}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if box_order not in BOX_ORDERS:
        raise ValueError(f"box_order must be one of {BOX_ORDERS}, got {box_order!r}")
    low, high = (int(bound) for bound in torch.aminmax(indices))
    if low < 0 or high >= num_classes:
        raise ValueError(f"indices must lie in [0, {num_classes}), got values in [{low}, {high}]")


def _check_output_size(output_size: int | tuple[int, int]) -> tuple[int, int]:
    """(sh, sw) of an output size; ValueError for an unusable one."""
    size = (output_size, output_size) if isinstance(output_size, int) else output_size
    if not (
        isinstance(size, (tuple, list))
        and len(size) == 2
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in size)
    ):
        raise ValueError(f"output_size must be a positive int or a pair of them, got {output_size!r}")
    return tuple(size)


def _bin_cells(
    boxes: Tensor, height: int, width: int, out_h: int, out_w: int, box_order: str, flipped: Tensor | None
) -> tuple[Tensor, Tensor]:
    """[B, 4] normalised boxes -> (cells int64 [B, sh * sw, L], weights [B, sh * sw, L]): for every
    output bin, the map cells (y * w + x) of a band of Ly rows by Lx columns around the cells that
    weigh in it, and their weights (a row's times a column's; RoI frame per ``box_order``).
    Flipped boxes take their column bins in reverse order."""
    weight_y, weight_x = _bin_axis_weights(boxes, height, width, out_h, out_w, box_order)
    if flipped is not None:
        weight_x = torch.where(flipped[:, None, None], weight_x.flip(1), weight_x)
    rows, row_weights = _band(weight_y)  # [B, sh, Ly]
    columns, column_weights = _band(weight_x)  # [B, sw, Lx]
    cells = rows[:, :, None, :, None] * width + columns[:, None, :, None, :]  # [B, sh, sw, Ly, Lx]
    weights = row_weights[:, :, None, :, None] * column_weights[:, None, :, None, :]
    batch = len(boxes)
    return cells.view(batch, out_h * out_w, -1), weights.view(batch, out_h * out_w, -1)


def _bin_axis_weights(
    boxes: Tensor, height: int, width: int, out_h: int, out_w: int, box_order: str
) -> tuple[Tensor, Tensor]:
    """[B, 4] normalised boxes -> (weight_y [B, sh, h], weight_x [B, sw, w]): each map row's and
    column's weight in each bin row and column (RoI frame per ``box_order``)."""
    if box_order == "xyxy":
        cell_boxes = boxes * boxes.new_tensor([width, height, width, height]) - 0.5
    else:
        cell_boxes = boxes.reshape(-1, 2, 2).flip(2).view(-1, 4) * width - 0.5
    start, end = cell_boxes.view(len(cell_boxes), 2, 2).unbind(1)  # [B, 2] each: x, then y
    if (height, out_h) == (width, out_w):  # both axes at once
        weight_x, weight_y = _axis_weights(start, end, width, out_w).unbind(1)
        return weight_y, weight_x
    return _axis_weights(start[:, 1], end[:, 1], height, out_h), _axis_weights(start[:, 0], end[:, 0], width, out_w)


def _band(weights: Tensor) -> tuple[Tensor, Tensor]:
    """Weights of the cells of an axis in each bin [B, bins, length] -> (cells int64 [B, bins, L],
    their weights [B, bins, L]): L consecutive cells from each bin's first weighted cell, L the
    widest span of weighted cells of any bin; cells past the end become the last cell, weighing 0."""
    length = weights.shape[-1]
    weighted = weights != 0
    first = weighted.to(torch.uint8).argmax(-1)  # argmax gives the first maximum
    last = length - 1 - weighted.flip(-1).to(torch.uint8).argmax(-1)
    span = int(torch.where(weighted.any(-1), last - first, 0).max()) + 1
    cells = first[..., None] + torch.arange(span, device=weights.device)
    band_weights = F.pad(weights, (0, span)).gather(-1, cells)
    return cells.clamp_(max=length - 1), band_weights


def _axis_weights(start: Tensor, end: Tensor, length: int, bins: int) -> Tensor:
    """RoI starts and ends [*] along one axis (cell j spans [j - 0.5, j + 0.5]) -> [*, bins, length]:
    the weight of each cell in each bin, as roi_align (aligned=False, sampling_ratio=-1) gives it.

    roi_align is separable: the RoI length is clamped to >= 1 and cut into `bins` bins of
    ceil(length / bins) sampling points each (the count of a 2-D bin is the product of the two
    axes'); a point outside [-1, length] adds nothing, one in [-1, 0] is moved to 0, one at or past
    the last cell centre takes that cell alone, any other splits linearly between its two cells.
    Positions follow roi_align's arithmetic: start + bin * bin_size + (i + 0.5) * bin_size / grid.
    """
    start, end = start[..., None, None], end[..., None, None]  # [*, 1, 1]
    bin_size = (end - start).clamp_min_(1.0)
    if bins > 1:  # (one bin is the whole RoI)
        # A divisor on the device: CUDA divides by a Python number as a product with its
        # reciprocal, which rounds bin sizes differently from roi_align (on the CPU and on CUDA).
        bin_size = bin_size / start.new_full((), bins)
        start = start + torch.arange(bins, dtype=start.dtype, device=start.device)[:, None] * bin_size
    grid = bin_size.ceil()  # sampling points per bin
    offsets = torch.arange(0.5, int(grid.max()), dtype=start.dtype, device=start.device)  # [G]: i + 0.5
    x = start + offsets * bin_size / grid  # [*, bins, G]
    share = ((offsets < grid) & (x.clamp(-1.0, length) == x)) / grid  # a counted point's share of its bin
    x = x.clamp_(0.0, length - 1)  # past the last centre: that cell alone (its fraction is 0 there)
    low_cell = x.long()  # the floor, as x >= 0
    high_share = x.frac_().mul_(share)
    weights = start.new_zeros(*share.shape[:-1], length + 1)  # the extra column takes only zeros
    weights.scatter_add_(-1, low_cell, share - high_share)
    weights.scatter_add_(-1, low_cell + 1, high_share)
    return weights[..., :length]
