"""LabelPooling on sparse top-k maps against torchvision's roi_align on the dense map."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import roi_align
from torchvision.transforms import RandomResizedCrop

from trt_relabel.pooling import label_pooling, pooled_entries, soft_target

# (x1, y1, x2, y2), normalised: the whole image, corners, edges, a tiny box, a point, a box inside
# one cell, thin boxes, an inverted box (RoI size clamped to 1) and boxes reaching past the image
# (sampling points below -1 or above the map size weigh nothing).
SPECIAL_BOXES = [
    [0.0, 0.0, 1.0, 1.0],
    [0.0, 0.0, 0.1, 0.1],
    [0.9, 0.9, 1.0, 1.0],
    [0.8, 0.0, 1.0, 0.15],
    [0.0, 0.3, 1.0, 0.6],
    [0.4, 0.0, 0.62, 1.0],
    [0.5, 0.5, 0.5001, 0.5001],
    [0.3, 0.7, 0.3, 0.7],
    [0.51, 0.52, 0.55, 0.56],
    [0.1, 0.45, 0.9, 0.47],
    [0.45, 0.05, 0.47, 0.95],
    [0.6, 0.6, 0.4, 0.3],
    [-0.1, -0.1, 1.1, 1.1],
    [-0.3, 0.2, 0.2, 1.3],
]


def random_top_k(batch: int, k: int, height: int, width: int, num_classes: int, seed: int):
    """Logit-like values [B, k, h, w] float32 and distinct classes per cell [B, k, h, w] int16."""
    generator = torch.Generator().manual_seed(seed)
    values = 4 * torch.randn(batch, k, height, width, generator=generator)
    scores = torch.rand(batch, num_classes, height, width, generator=generator)
    return values, scores.topk(k, dim=1).indices.to(torch.int16)


def random_boxes(count: int, seed: int) -> torch.Tensor:
    """[count, 4] float32 boxes (x1, y1, x2, y2) inside the image."""
    generator = torch.Generator().manual_seed(seed)
    corners = torch.rand(count, 2, 2, generator=generator).sort(dim=1).values  # [box, corner, (x, y)]
    return corners.transpose(1, 2).reshape(count, 4)


def sample_boxes(batch: int, seed: int) -> torch.Tensor:
    """SPECIAL_BOXES, then random boxes: [batch, 4] float32."""
    return torch.cat([torch.tensor(SPECIAL_BOXES), random_boxes(batch - len(SPECIAL_BOXES), seed)])


def dense_map(values: torch.Tensor, indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The dense [B, C, h, w] map: values at indices, zeros elsewhere (as the official get_labelmaps)."""
    batch, _, height, width = values.shape
    dense = values.new_zeros(batch, num_classes, height, width)
    return dense.scatter(1, indices.long(), values)


def dense_roi_align(dense: torch.Tensor, rois: torch.Tensor, output_size) -> torch.Tensor:
    """torchvision roi_align of image b's map over rois[b] (x1, y1, x2, y2 in cells), as LabelPooling."""
    batch_index = torch.arange(len(rois), dtype=rois.dtype, device=rois.device)[:, None]
    return roi_align(dense, torch.cat([batch_index, rois], 1), output_size, 1.0, -1, False)


@pytest.mark.parametrize(
    ("height", "width", "num_classes", "dtype"),
    [
        (15, 15, 1000, torch.float32),
        (7, 9, 12, torch.float32),
        (9, 7, 12, torch.float64),
        (15, 15, 1000, torch.float16),
    ],
)
@pytest.mark.parametrize("output_size", [1, 2, 3, 7, (2, 3)])
def test_matches_roi_align_on_the_dense_map(height, width, num_classes, dtype, output_size):
    values, indices = random_top_k(16, 5, height, width, num_classes, seed=height)
    values = values.to(dtype)
    boxes = sample_boxes(16, seed=width)
    compute_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    pooled = label_pooling(values, indices, boxes, num_classes, output_size)

    scale = torch.tensor([width, height, width, height], dtype=compute_dtype)
    dense = dense_map(values.to(compute_dtype), indices, num_classes)
    expected = dense_roi_align(dense, boxes.to(compute_dtype) * scale - 0.5, output_size)
    if output_size == 1:
        expected = expected.view(16, num_classes)
    else:
        assert pooled.is_contiguous(memory_format=torch.channels_last)
    assert pooled.dtype == compute_dtype
    assert pooled.shape == expected.shape
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=0)


def test_full_image_box_is_the_mean_and_a_cell_box_is_the_cell():
    height, width, num_classes = 7, 9, 30
    values, indices = random_top_k(2, 3, height, width, num_classes, seed=1)
    dense = dense_map(values, indices, num_classes)
    row, col = 2, 6
    cell_box = [col / width, row / height, (col + 1) / width, (row + 1) / height]
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], cell_box])

    pooled = label_pooling(values, indices, boxes, num_classes)

    torch.testing.assert_close(pooled[0], dense[0].mean((1, 2)), atol=1e-6, rtol=0)
    torch.testing.assert_close(pooled[1], dense[1, :, row, col], atol=1e-6, rtol=0)


@pytest.mark.parametrize(("height", "width"), [(15, 15), (7, 9)])
def test_reference_order_reproduces_the_official_targets(height, width):
    """naver-ai/relabel_imagenet: RandomResizedCropWithCoords gives (i/H, j/W, h/H, w/W); the loader
    adds the origin to the size and get_relabel passes coords * map width - 0.5 to roi_align."""
    num_classes, batch = 1000, 16
    values, indices = random_top_k(batch, 5, height, width, num_classes, seed=3)
    torch.manual_seed(0)
    image_height, image_width = 375, 500
    crops = [
        RandomResizedCrop.get_params(torch.empty(3, image_height, image_width), (0.08, 1.0), (3 / 4, 4 / 3))
        for _ in range(batch)
    ]
    official_coords = torch.tensor(
        [[i / image_height, j / image_width, h / image_height, w / image_width] for i, j, h, w in crops]
    )
    official_coords[:, 2:] += official_coords[:, :2]
    boxes = torch.tensor(
        [[j / image_width, i / image_height, (j + w) / image_width, (i + h) / image_height] for i, j, h, w in crops]
    )

    pooled = label_pooling(values, indices, boxes, num_classes, box_order="reference")

    dense = dense_map(values, indices, num_classes)
    official = dense_roi_align(dense, official_coords.float() * dense.size(3) - 0.5, (1, 1)).squeeze()
    torch.testing.assert_close(pooled, official, atol=1e-5, rtol=0)
    torch.testing.assert_close(soft_target(pooled), torch.softmax(official, 1), atol=1e-6, rtol=0)
    correct = label_pooling(values, indices, boxes, num_classes)
    assert (correct - pooled).abs().max() > 0.1  # the official crop is transposed


@pytest.mark.parametrize("index_dtype", [torch.uint8, torch.int32, torch.int64])
def test_index_dtypes_agree_with_int16(index_dtype):
    values, indices = random_top_k(4, 5, 15, 15, 200, seed=4)
    boxes = random_boxes(4, seed=4)
    expected = label_pooling(values, indices, boxes, 200, output_size=3)
    assert torch.equal(label_pooling(values, indices.to(index_dtype), boxes, 200, output_size=3), expected)


@pytest.mark.parametrize("box_order", ["xyxy", "reference"])
def test_strided_inputs_agree_with_contiguous_ones(box_order):
    values, indices = random_top_k(4, 5, 15, 15, 200, seed=6)
    boxes = random_boxes(4, seed=6)
    expected = label_pooling(values, indices, boxes, 200, output_size=2, box_order=box_order)
    column_major_boxes = boxes.t().contiguous().t()
    pooled = label_pooling(
        values.transpose(2, 3).contiguous().transpose(2, 3),  # a cell's row is not contiguous
        indices.contiguous(memory_format=torch.channels_last),
        column_major_boxes,
        200,
        output_size=2,
        box_order=box_order,
    )
    assert torch.equal(pooled, expected)


@pytest.mark.parametrize("box_order", ["xyxy", "reference"])
@pytest.mark.parametrize("output_size", [1, 7, (2, 3)])
def test_flipped_boxes_mirror_the_output_bins_exactly(box_order, output_size):
    values, indices = random_top_k(16, 5, 15, 15, 100, seed=9)
    boxes = sample_boxes(16, seed=9)
    flipped = torch.arange(16) % 3 == 0
    pooled = label_pooling(values, indices, boxes, 100, output_size, box_order)
    mirrored = pooled if output_size == 1 else torch.where(flipped[:, None, None, None], pooled.flip(-1), pooled)
    assert torch.equal(label_pooling(values, indices, boxes, 100, output_size, box_order, flipped), mirrored)


@pytest.mark.parametrize("output_size", [1, 7])
def test_pooled_entries_add_up_to_label_pooling(output_size):
    values, indices = random_top_k(16, 5, 15, 15, 100, seed=10)
    boxes = sample_boxes(16, seed=10)
    classes, scores = pooled_entries(values, indices, boxes, 100, output_size)
    bins = output_size * output_size
    assert classes.shape == scores.shape and classes.shape[:2] == (16, bins)
    assert classes.shape[2] < 5 * 15 * 15 or output_size == 1  # a small bin reaches a band of cells
    added = torch.zeros(16, bins, 100).scatter_add_(2, classes, scores)
    pooled = label_pooling(values, indices, boxes, 100, output_size)
    assert torch.equal(added.permute(0, 2, 1).reshape(pooled.shape), pooled)


def test_gradient_flows_to_values_as_through_roi_align():
    values, indices = random_top_k(4, 5, 7, 9, 50, seed=5)
    boxes = random_boxes(4, seed=5)
    values.requires_grad_(True)
    label_pooling(values, indices, boxes, 50, output_size=2).square().sum().backward()
    sparse_grad, values.grad = values.grad, None

    rois = boxes * torch.tensor([9, 7, 9, 7]) - 0.5
    dense_roi_align(dense_map(values, indices, 50), rois, 2).square().sum().backward()
    torch.testing.assert_close(sparse_grad, values.grad, atol=1e-5, rtol=0)


def test_soft_target_is_a_distribution_over_classes():
    values, indices = random_top_k(3, 5, 7, 7, 40, seed=6)
    target = soft_target(label_pooling(values, indices, random_boxes(3, seed=6), 40))
    torch.testing.assert_close(target.sum(1), torch.ones(3))
    assert (target > 0).all()


VALUES, INDICES = random_top_k(2, 5, 7, 7, 10, seed=7)
BOXES = torch.tensor([[0.1, 0.1, 0.5, 0.5], [0.0, 0.2, 1.0, 0.9]])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"values": VALUES[0]}, r"values must be a non-empty float tensor \[B, k, h, w\], got .* \(5, 7, 7\)"),
        ({"values": INDICES}, r"values must be a non-empty float tensor"),
        ({"values": VALUES[:0]}, r"values must be a non-empty float tensor"),
        ({"indices": INDICES[:, :3]}, r"indices must be an integer tensor of the shape of values"),
        ({"indices": VALUES}, r"indices must be an integer tensor"),
        ({"indices": INDICES > 3}, r"indices must be integers"),
        ({"indices": INDICES - 1}, r"indices must lie in \[0, 10\), got values in \[-1, 8\]"),
        ({"num_classes": 9}, r"indices must lie in \[0, 9\), got values in \[0, 9\]"),
        ({"num_classes": 0}, r"num_classes must be a positive int, got 0"),
        ({"boxes": BOXES[:1]}, r"boxes must be \[B, 4\] = \[2, 4\], got \(1, 4\)"),
        ({"boxes": BOXES[:, :3]}, r"boxes must be \[B, 4\]"),
        ({"output_size": 0}, r"output_size must be a positive int or a pair of them, got 0"),
        ({"output_size": (2, 2, 2)}, r"output_size must be a positive int or a pair"),
        ({"output_size": 1.0}, r"output_size must be a positive int or a pair"),
        ({"box_order": "yxyx"}, r"box_order must be one of \('xyxy', 'reference'\), got 'yxyx'"),
        ({"flipped": torch.tensor([1, 0])}, r"flipped must be a bool tensor \[B\] = \[2\], got torch.int64 \(2,\)"),
        ({"flipped": torch.tensor([True])}, r"flipped must be a bool tensor \[B\] = \[2\]"),
    ],
)
def test_bad_arguments_raise_clear_errors(arguments, message):
    call = {"values": VALUES, "indices": INDICES, "boxes": BOXES, "num_classes": 10} | arguments
    with pytest.raises(ValueError, match=message):
        label_pooling(**call)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("output_size", [1, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_roi_align_and_the_cpu(output_size, dtype):
    values, indices = random_top_k(16, 5, 15, 15, 1000, seed=8)
    values, boxes = values.to(dtype), sample_boxes(16, seed=8).to(dtype)
    on_cpu = label_pooling(values, indices, boxes, 1000, output_size)

    values, indices, boxes = values.cuda(), indices.cuda(), boxes.cuda()
    pooled = label_pooling(values, indices, boxes, 1000, output_size)

    rois = boxes * 15 - 0.5
    expected = dense_roi_align(dense_map(values, indices, 1000), rois, output_size).view(pooled.shape)
    assert pooled.device == values.device and pooled.dtype == dtype
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled.cpu(), on_cpu, atol=1e-5, rtol=0)
