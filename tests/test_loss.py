"""YOLOv3 loss: hand-computed values, Darknet's assignment rules, the ignore threshold, and a slow loop reference."""
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision

from models import build_model
from models.loss import YOLOLoss, build_loss
from models.tables import ANCHOR_MASKS, DARKNET_ANCHORS, STRIDES
from models.yolo import decode
from utils.config import LossConfig

LOG2 = math.log(2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Many tiny ops: one thread is faster, and immune to a busy machine (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def bce(x, t):
    """BCE-with-logits of one logit x against target t, by hand: log(1 + e^x) - t * x."""
    return math.log1p(math.exp(x)) - t * x


def layout(arch):
    return torch.tensor(DARKNET_ANCHORS[arch], dtype=torch.float32), ANCHOR_MASKS[arch], STRIDES[arch]


def raw_maps(arch, batch, height, width, num_classes, generator=None, scale=0.0):
    """Raw head outputs (B, 3, H/s, W/s, 5+C) for an input of height x width, zero or random (requires grad)."""
    return [(torch.randn(batch, 3, height // s, width // s, 5 + num_classes, generator=generator) * scale)
            .requires_grad_() for s in STRIDES[arch]]


# -- a single 2x2 head, computed by hand ---------------------------------------------------------------------------
# anchors (10,13), (30,30), (60,50); one head, stride 32, 64x64 input (2x2 grid), 2 classes.
# The ground truth cx=40, cy=20, w=24, h=36, class 1: wh-IoU with (10,13) = 130/864 = 0.15, with (30,30) =
# 24*30/(864+900-720) = 0.69, with (60,50) = 864/3000 = 0.29 -> best anchor 1 (slot 1); cell col = floor(40/32) = 1,
# row = floor(20/32) = 0; in-cell offset (40/32 - 1, 20/32 - 0) = (0.25, 0.625); wh target log(24/30), log(36/30);
# scale = 2 - 24*36/(64*64) = 2 - 0.2109375.
SMALL_ANCHORS = torch.tensor([[10.0, 13.0], [30.0, 30.0], [60.0, 50.0]])
SMALL_GT = torch.tensor([[0.0, 1.0, 40.0, 20.0, 24.0, 36.0]])
SMALL_SCALE = 2 - 24 * 36 / (64 * 64)


def small_loss(**kwargs):
    return YOLOLoss(SMALL_ANCHORS, ((0, 1, 2),), (32,), num_classes=2, **kwargs)


def test_hand_computed_positive_location():
    positives = small_loss().assign(SMALL_GT, [(2, 2)])
    # [target index, image, anchor slot, row, column]
    assert positives[0].tolist() == [[0, 0, 1, 0, 1]]


def test_hand_computed_zero_outputs():
    raw = torch.zeros(1, 3, 2, 2, 7, requires_grad=True)
    total, terms = small_loss()([raw], SMALL_GT)
    # every BCE with a zero logit is log 2 whatever the target
    xy = SMALL_SCALE * 2 * LOG2
    wh = SMALL_SCALE * 0.5 * (math.log(24 / 30) ** 2 + math.log(36 / 30) ** 2)
    # 3 anchors x 4 cells: 1 positive + 11 negatives, none ignored (the decoded boxes are the anchors at the cell
    # centres; the best overlap, slot 2 at (48, 16), is 864/3000 = 0.29)
    obj = 12 * LOG2
    cls = 2 * LOG2
    expected = {"xy": xy, "wh": wh, "obj": obj, "cls": cls}
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-6), name
    assert total.item() == pytest.approx(sum(expected.values()), rel=1e-6)


def test_hand_computed_chosen_outputs():
    raw = torch.zeros(1, 3, 2, 2, 7)
    raw[0, 1, 0, 1] = torch.tensor([1.0, -1.0, 0.5, 0.0, 2.0, 0.5, -0.5])  # the positive: slot 1, row 0, col 1
    raw[0, 0, 1, 1, 4] = -3.0  # a negative's objectness
    raw[0, 2, 1, 0, 5:] = 4.0  # class logits of a negative: no class loss
    total, terms = small_loss()([raw.requires_grad_()], SMALL_GT)
    xy = SMALL_SCALE * (bce(1.0, 0.25) + bce(-1.0, 0.625))
    wh = SMALL_SCALE * 0.5 * ((0.5 - math.log(24 / 30)) ** 2 + (0.0 - math.log(36 / 30)) ** 2)
    obj = bce(2.0, 1) + bce(-3.0, 0) + 10 * LOG2
    cls = bce(0.5, 0) + bce(-0.5, 1)
    for name, value in {"xy": xy, "wh": wh, "obj": obj, "cls": cls}.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-6), name
    assert total.item() == pytest.approx(xy + wh + obj + cls, rel=1e-6)


def test_weights_and_batch_normalisation():
    raw = torch.zeros(2, 3, 2, 2, 7, requires_grad=True)  # image 1 has no ground truth: 12 more log 2 negatives
    weights = {"xy_weight": 2.0, "wh_weight": 3.0, "obj_weight": 0.5, "cls_weight": 4.0}
    _, terms = small_loss(**weights)([raw], SMALL_GT)
    _, unweighted = small_loss()([raw], SMALL_GT)
    assert terms["obj"].item() == pytest.approx(0.5 * 24 * LOG2 / 2, rel=1e-6)
    for name in ("xy", "wh", "obj", "cls"):
        assert terms[name].item() == pytest.approx(weights[f"{name}_weight"] * unweighted[name].item(), rel=1e-6)


def test_build_loss_from_config():
    model = build_model("yolov3-tiny", num_classes=3)
    loss = build_loss(model, LossConfig(ignore_threshold=0.5, cls_weight=2.0))
    assert loss.ignore_threshold == 0.5 and loss.weights["cls"] == 2.0 and loss.num_classes == 3
    assert torch.equal(loss.anchors, model.anchors) and loss.masks == model.masks and loss.strides == model.strides


# -- Darknet's assignment on the real layouts ----------------------------------------------------------------------
def test_yolov3_assignment():
    model = build_model("yolov3", num_classes=3)
    loss = YOLOLoss(model.anchors, model.masks, model.strides, 3)
    targets = torch.tensor([[0.0, 0.0, 200.0, 150.0, 116.0, 90.0],   # anchor 6: stride 32, slot 0
                            [1.0, 2.0, 100.0, 60.0, 10.0, 13.0],     # anchor 0: stride 8, slot 0
                            [1.0, 1.0, 300.0, 310.0, 62.0, 45.0]])   # anchor 4: stride 16, slot 1
    heads = loss.assign(targets, [(13, 13), (26, 26), (52, 52)])
    assert heads[0].tolist() == [[0, 0, 0, 150 // 32, 200 // 32]]
    assert heads[1].tolist() == [[2, 1, 1, 310 // 16, 300 // 16]]
    assert heads[2].tolist() == [[1, 1, 0, 60 // 8, 100 // 8]]


def test_yolov3_tiny_shared_anchor_and_orphan_anchor():
    model = build_model("yolov3-tiny", num_classes=3)
    loss = YOLOLoss(model.anchors, model.masks, model.strides, 3)
    # (81, 82) is anchor 3, in both masks (3,4,5) and (1,2,3); (10, 14) is anchor 0, in neither mask: Darknet
    # would pick it and assign the box nowhere; here only used anchors compete, so it goes to anchor 1 (23, 27)
    targets = torch.tensor([[0.0, 1.0, 100.0, 40.0, 81.0, 82.0], [0.0, 2.0, 20.0, 20.0, 10.0, 14.0]])
    heads = loss.assign(targets, [(2, 4), (4, 8)])  # a 64x128 input
    assert heads[0].tolist() == [[0, 0, 0, 40 // 32, 100 // 32]]  # slot 0 of (3,4,5)
    assert sorted(heads[1].tolist()) == [[0, 0, 2, 40 // 16, 100 // 16],  # slot 2 of (1,2,3): anchor 3
                                         [1, 0, 0, 20 // 16, 20 // 16]]  # slot 0 of (1,2,3): anchor 1


def test_centre_on_border_is_clamped_into_the_grid():
    loss = small_loss()
    targets = torch.tensor([[0.0, 0.0, 64.0, 0.0, 30.0, 30.0], [0.0, 0.0, -1.0, 70.0, 30.0, 30.0]])
    heads = loss.assign(targets, [(2, 2)])
    assert sorted(heads[0][:, 3:].tolist()) == [[0, 1], [1, 0]]
    total, _ = loss([torch.zeros(1, 3, 2, 2, 7, requires_grad=True)], targets)
    assert torch.isfinite(total)


# -- ignore threshold ----------------------------------------------------------------------------------------------
def ignore_case(image_of_gt=0):
    """One head, anchors 16, 32, 64 (square), 2x2 grid; a 32x32 ground truth at (48, 48): best anchor 32 (slot 1) at
    cell (1, 1). The slot-2 prediction there decodes to exp(log 0.5) * 64 = 32 at (48, 48): IoU ~1, a negative."""
    loss_anchors = torch.tensor([[16.0, 16.0], [32.0, 32.0], [64.0, 64.0]])
    raw = torch.zeros(2, 3, 2, 2, 6)
    raw[0, 2, 1, 1, 2:4] = math.log(0.5)
    raw[0, 2, 1, 1, 4] = 2.0  # its objectness logit
    targets = torch.tensor([[float(image_of_gt), 0.0, 48.0, 48.0, 32.0, 32.0]])
    return loss_anchors, raw.requires_grad_(), targets


def test_ignore_threshold_exact_difference():
    anchors, raw, targets = ignore_case()
    obj = {t: YOLOLoss(anchors, ((0, 1, 2),), (32,), 1, ignore_threshold=t)([raw], targets)[1]["obj"].item()
           for t in (0.7, 1.0)}
    # only that prediction is spared: its BCE against 0, softplus(2), over a batch of 2
    assert obj[1.0] - obj[0.7] == pytest.approx(bce(2.0, 0) / 2, rel=1e-6)
    # no other prediction overlaps enough: with every other logit 0, the 0.7 loss is 23 * log 2 / 2
    assert obj[0.7] == pytest.approx(23 * LOG2 / 2, rel=1e-6)


def test_ignore_needs_a_ground_truth_of_the_same_image():
    anchors, raw, targets = ignore_case(image_of_gt=1)
    obj = {t: YOLOLoss(anchors, ((0, 1, 2),), (32,), 1, ignore_threshold=t)([raw], targets)[1]["obj"].item()
           for t in (0.7, 1.0)}
    assert obj[0.7] == obj[1.0]


def test_ignore_threshold_below_iou_keeps_the_penalty():
    anchors, raw, targets = ignore_case()
    with torch.no_grad():
        raw[0, 2, 1, 1, 2:4] = math.log(0.75)  # a 48x48 box at (48, 48): IoU 1024 / 2304 = 0.44
    obj = {t: YOLOLoss(anchors, ((0, 1, 2),), (32,), 1, ignore_threshold=t)([raw], targets)[1]["obj"].item()
           for t in (0.4, 0.5, 1.0)}
    assert obj[0.5] == obj[1.0]
    assert obj[1.0] - obj[0.4] == pytest.approx(bce(2.0, 0) / 2, rel=1e-6)


# -- crowd regions (class -1): never positives, predictions at least half inside one are not pushed to background ---
# In the small layout zero outputs decode to the anchors (10,13), (30,30), (60,50) centred in the cells, at x and y
# 16 (row / column 0) or 48 (1). The fraction of a prediction inside a crowd region is intersection / its own area.
CROWD = -1.0


@pytest.mark.parametrize("ignore_threshold", [0.7, 1.0])  # the crowd rule does not depend on the IoU threshold
def test_crowd_region_ignores_the_predictions_mostly_inside_it(ignore_threshold):
    # crowd xyxy (0, 0, 40, 40) in image 1 of 2. At (16, 16): (10,13) and (30,30) lie wholly inside, (60,50) spans
    # -14..46 x -9..41, inside 40 * 40 / 3000 = 0.53. Every other prediction is inside by at most 22 * 40 / 3000 =
    # 0.29 ((60,50) at (48, 16)). So 3 of the 24 predictions get no loss; by IoU none would (the best, (30,30) at
    # (16, 16), has 900 / 1600 = 0.56)
    crowd = torch.tensor([[1.0, CROWD, 20.0, 20.0, 40.0, 40.0]])
    raw = torch.zeros(2, 3, 2, 2, 7, requires_grad=True)
    loss = small_loss(ignore_threshold=ignore_threshold)
    total, terms = loss([raw], crowd)
    assert terms["obj"].item() == pytest.approx((24 - 3) * LOG2 / 2, rel=1e-6)
    assert terms["xy"] == terms["wh"] == terms["cls"] == 0 and total.item() == terms["obj"].item()
    assert loss.assign(crowd, [(2, 2)])[0].tolist() == []  # never a positive
    found = loss.ignored(torch.zeros(4, 3, 8), crowd, [(2, 2)]).view(3, 2, 4)  # [slot, image, row * 2 + col]
    assert found[:, 1, 0].all() and found.sum() == 3


def test_crowd_rule_at_exactly_half_and_an_object_inside_a_crowd_stays_positive():
    # crowd xyxy (0, 0, 48, 64). Column 0 (x 16): (10,13) and (30,30) wholly inside, (60,50) 46 * 41 / 3000 = 0.63
    # in both rows -> 6 ignored. Column 1 (x 48): (10,13) spans x 43..53 and (30,30) 33..63, both exactly half inside
    # (5 of 10, 15 of 30 px), ignored as COCOeval matches at IoU >= its threshold; (60,50): 30 / 60 * 41 / 50 = 0.41,
    # penalised -> 10 of 12 ignored. SMALL_GT's positive (slot 1, row 0, col 1) is one of the half-inside ones: it
    # keeps target 1, and its xy, wh and cls terms are those of test_hand_computed_zero_outputs.
    crowd = torch.tensor([[0.0, CROWD, 24.0, 32.0, 48.0, 64.0]])
    loss = small_loss()
    _, alone = loss([torch.zeros(1, 3, 2, 2, 7, requires_grad=True)], crowd)
    assert alone["obj"].item() == pytest.approx(2 * LOG2, rel=1e-6)
    targets = torch.cat([crowd, SMALL_GT])  # the crowd first: it must not take or shift the positive's slot
    assert loss.assign(targets, [(2, 2)])[0].tolist() == [[1, 0, 1, 0, 1]]
    _, terms = loss([torch.zeros(1, 3, 2, 2, 7, requires_grad=True)], targets)
    assert terms["obj"].item() == pytest.approx(bce(0.0, 1) + 2 * LOG2, rel=1e-6)
    assert terms["xy"].item() == pytest.approx(SMALL_SCALE * 2 * LOG2, rel=1e-6)
    assert terms["wh"].item() == pytest.approx(SMALL_SCALE * 0.5 * (math.log(24 / 30) ** 2 + math.log(36 / 30) ** 2),
                                               rel=1e-6)
    assert terms["cls"].item() == pytest.approx(2 * LOG2, rel=1e-6)


# -- duplicates ----------------------------------------------------------------------------------------------------
def test_duplicate_slot_later_target_wins_deterministically():
    # both at cell (1, 0) with best anchor (30, 30) (26x34: IoU 780/1004 = 0.78), different classes and offsets
    first = [0.0, 0.0, 40.0, 20.0, 24.0, 36.0]
    later = [0.0, 1.0, 50.0, 10.0, 26.0, 34.0]
    raw = torch.randn(1, 3, 2, 2, 7, generator=torch.Generator().manual_seed(0)).requires_grad_()
    loss = small_loss(ignore_threshold=1.0)  # the earlier box must not matter through the ignore test either
    both = torch.tensor([first, later])
    assert loss.assign(both, [(2, 2)])[0].tolist() == [[1, 0, 1, 0, 1]]
    runs = [loss([raw], both)[0] for _ in range(5)]
    assert all(torch.equal(r, runs[0]) for r in runs)
    assert torch.equal(runs[0], loss([raw], torch.tensor([later]))[0])
    assert torch.equal(loss([raw], torch.tensor([later, first]))[0], loss([raw], torch.tensor([first]))[0])


# -- batch invariance, zero targets, gradients ---------------------------------------------------------------------
def random_targets(generator, batch, per_image, height, width, num_classes=3):
    k = batch * per_image
    wh = torch.rand(k, 2, generator=generator) * torch.tensor([width, height]) * 0.6 + 4
    centre = torch.rand(k, 2, generator=generator) * torch.tensor([width, height])
    image = torch.arange(batch).repeat_interleave(per_image)[:, None].float()
    classes = torch.randint(0, num_classes, (k, 1), generator=generator).float()
    return torch.cat([image, classes, centre, wh], 1)


def test_batch_of_copies_equals_one_image():
    g = torch.Generator().manual_seed(1)
    anchors, masks, strides = layout("yolov3")
    loss = YOLOLoss(anchors, masks, strides, 3)
    one = raw_maps("yolov3", 1, 96, 64, 3, g, scale=1.0)
    targets = random_targets(g, 1, 6, 96, 64)
    four = [o.detach().repeat(4, 1, 1, 1, 1) for o in one]
    targets4 = torch.cat([targets.clone().index_fill_(1, torch.tensor([0]), float(i)) for i in range(4)])
    total1, terms1 = loss(one, targets)
    total4, terms4 = loss(four, targets4)
    torch.testing.assert_close(total4, total1)
    for name in terms1:
        torch.testing.assert_close(terms4[name], terms1[name])


def test_batch_loss_is_mean_of_image_losses():
    g = torch.Generator().manual_seed(2)
    anchors, masks, strides = layout("yolov3")
    loss = YOLOLoss(anchors, masks, strides, 3)
    outputs = raw_maps("yolov3", 3, 64, 96, 3, g, scale=1.0)
    targets = random_targets(g, 3, 5, 64, 96)
    singles = []
    for i in range(3):
        mine = targets[targets[:, 0] == i].clone()
        mine[:, 0] = 0
        singles.append(loss([o[i:i + 1] for o in outputs], mine)[0])
    torch.testing.assert_close(loss(outputs, targets)[0], torch.stack(singles).mean())


def test_zero_targets():
    anchors, masks, strides = layout("yolov3")
    outputs = raw_maps("yolov3", 2, 64, 64, 3, torch.Generator().manual_seed(3), scale=1.0)
    total, terms = YOLOLoss(anchors, masks, strides, 3)(outputs, torch.zeros(0, 6))
    assert torch.isfinite(total) and terms["obj"] > 0
    assert terms["xy"] == 0 and terms["wh"] == 0 and terms["cls"] == 0
    # all negatives: the mean over images of sum softplus(objectness)
    expected = sum(F.softplus(o[..., 4]).sum() for o in outputs) / 2
    torch.testing.assert_close(total, expected)
    total.backward()
    assert all(o.grad is not None and torch.isfinite(o.grad).all() and o.grad[..., 4].abs().sum() > 0
               for o in outputs)


def test_gradient_reaches_every_head():
    anchors, masks, strides = layout("yolov3")
    outputs = raw_maps("yolov3", 1, 416, 416, 3, torch.Generator().manual_seed(4), scale=0.5)
    targets = torch.tensor([[0.0, 0.0, 200.0, 150.0, 116.0, 90.0],   # stride 32
                            [0.0, 1.0, 300.0, 310.0, 62.0, 45.0],    # stride 16
                            [0.0, 2.0, 100.0, 60.0, 10.0, 13.0]])    # stride 8
    total, _ = YOLOLoss(anchors, masks, strides, 3)(outputs, targets)
    total.backward()
    for o in outputs:
        assert torch.isfinite(o.grad).all()
        for channel in (slice(0, 4), 4, slice(5, None)):  # box, objectness and class channels all get gradient
            assert o.grad[..., channel].abs().sum() > 0


def test_loss_is_fp32_under_autocast():
    anchors, masks, strides = layout("yolov3-tiny")
    outputs = raw_maps("yolov3-tiny", 2, 64, 64, 3, torch.Generator().manual_seed(5), scale=1.0)
    targets = random_targets(torch.Generator().manual_seed(6), 2, 3, 64, 64)
    loss = YOLOLoss(anchors, masks, strides, 3)
    half = [o.detach().bfloat16().requires_grad_() for o in outputs]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total, _ = loss(half, targets)
    assert total.dtype == torch.float32
    torch.testing.assert_close(total, loss([h.detach().float() for h in half], targets)[0])
    total.backward()
    assert all(h.grad.dtype == torch.bfloat16 for h in half)


def test_bad_outputs_are_named():
    anchors, masks, strides = layout("yolov3")
    loss = YOLOLoss(anchors, masks, strides, 3)
    outputs = raw_maps("yolov3", 1, 64, 64, 3)
    with pytest.raises(ValueError, match="expected 3 head outputs"):
        loss(outputs[:2], torch.zeros(0, 6))
    with pytest.raises(ValueError, match=r"\(1, 3, 2, 2, 9\) at stride 32: expected \(1, 3, 2, 2, 8\)"):
        loss(raw_maps("yolov3", 1, 64, 64, 4), torch.zeros(0, 6))
    with pytest.raises(ValueError, match=r"targets must be \(K, 6\)"):
        loss(outputs, torch.zeros(3, 5))


# -- a slow loop reference -----------------------------------------------------------------------------------------
def reference_loss(outputs, targets, anchors, masks, strides, num_classes, ignore_threshold):
    """yolo_layer.c written as loops over ground truths and heads; the ignore IoU with torchvision's box_iou."""
    batch = outputs[0].shape[0]
    input_h, input_w = outputs[0].shape[2] * strides[0], outputs[0].shape[3] * strides[0]
    sums = dict.fromkeys(("xy", "wh", "obj", "cls"), torch.zeros(()))
    for raw, mask, stride in zip(outputs, masks, strides, strict=True):
        _, num_anchors, height, width, _ = raw.shape
        slots = {}  # (image, slot, row, col) -> target index; later targets overwrite
        for k, (image, _, cx, cy, w, h) in enumerate(targets.tolist()):
            ious = []
            for aw, ah in anchors.tolist():
                inter = min(w, aw) * min(h, ah)
                ious.append(inter / (w * h + aw * ah - inter))
            owned = {a for m in masks for a in m}  # anchors that no head uses never win
            best = max(owned, key=lambda i: (ious[i], -i))  # first of equal maxima
            if best in mask:
                col = min(max(int(math.floor(cx / stride)), 0), width - 1)
                row = min(max(int(math.floor(cy / stride)), 0), height - 1)
                slots[(int(image), mask.index(best), row, col)] = k
        negative = torch.ones(raw.shape[:4], dtype=torch.bool)
        for (image, slot, row, col), k in slots.items():
            negative[image, slot, row, col] = False
            _, cls, cx, cy, w, h = targets[k].tolist()
            p = raw[image, slot, row, col]
            scale = 2 - w * h / (input_w * input_h)
            offset = torch.tensor([cx / stride - col, cy / stride - row]).clamp(0, 1)  # centres outside the image
            sums["xy"] = sums["xy"] + scale * F.binary_cross_entropy_with_logits(p[:2], offset, reduction="sum")
            aw, ah = anchors[mask[slot]].tolist()
            target_wh = torch.tensor([math.log(w / aw), math.log(h / ah)])
            sums["wh"] = sums["wh"] + scale * 0.5 * ((p[2:4] - target_wh) ** 2).sum()
            one_hot = torch.zeros(num_classes)
            one_hot[int(cls)] = 1
            sums["cls"] = sums["cls"] + F.binary_cross_entropy_with_logits(p[5:], one_hot, reduction="sum")
            sums["obj"] = sums["obj"] + F.binary_cross_entropy_with_logits(p[4], torch.tensor(1.0))
        boxes = decode(raw.detach(), anchors[list(mask)], stride)[..., :4]  # (B, A*H*W, 4) cxcywh
        for image in range(batch):
            gts = targets[targets[:, 0] == image, 2:6]
            logits = raw[image, ..., 4].reshape(-1)
            keep = negative[image].reshape(-1).clone()
            if len(gts):
                iou = torchvision.ops.box_iou(torchvision.ops.box_convert(boxes[image], "cxcywh", "xyxy"),
                                              torchvision.ops.box_convert(gts, "cxcywh", "xyxy"))
                keep &= iou.max(1).values <= ignore_threshold
            sums["obj"] = sums["obj"] + F.softplus(logits[keep]).sum()
    return {name: value / batch for name, value in sums.items()}


def plant_overlaps(outputs, targets, anchors, masks, strides, generator):
    """Make one prediction per head and ground truth decode near it (IoU mostly 0.5-1): work for the ignore test."""
    with torch.no_grad():
        for raw, mask, stride in zip(outputs, masks, strides, strict=True):
            _, num_anchors, height, width, _ = raw.shape
            for image, _, cx, cy, w, h in targets.tolist():
                jitter = (torch.rand(4, generator=generator) * 0.2 - 0.1).tolist()
                x, y = cx + jitter[0] * w, cy + jitter[1] * h
                col, row = math.floor(x / stride), math.floor(y / stride)
                if not (0 <= col < width and 0 <= row < height):
                    continue
                slot = int(torch.randint(num_anchors, (1,), generator=generator))
                offset = torch.tensor([x / stride - col, y / stride - row]).clamp(1e-3, 1 - 1e-3)
                size = torch.tensor([w * (1 + jitter[2]), h * (1 + jitter[3])]) / anchors[mask[slot]]
                raw[int(image), slot, row, col, :4] = torch.cat([torch.logit(offset), size.log()])


def reference_case(arch, batch, per_image, height, width, seed):
    """Random raw maps, some decoding close to the ground truths, and random ground truths including a duplicate
    of a slot, a centre on the border and a box of anchor 0 (no head in yolov3-tiny)."""
    g = torch.Generator().manual_seed(seed)
    anchors, masks, strides = layout(arch)
    outputs = raw_maps(arch, batch, height, width, 3, g, scale=0.3)
    targets = random_targets(g, batch, per_image, height, width)
    targets[1, 2:] = targets[0, 2:] + 0.5  # same slot as target 0 (usually), later
    targets[2, 2] = width  # centre on the right border
    targets[3, 4:] = anchors[0] * 1.02  # anchor 0
    plant_overlaps(outputs, targets, anchors, masks, strides, g)
    return anchors, masks, strides, outputs, targets


@pytest.mark.parametrize("arch, ignore_threshold", [("yolov3", 0.9), ("yolov3", 0.7), ("yolov3", 0.4),
                                                    ("yolov3", 0.15), ("yolov3-tiny", 0.7), ("yolov3", 1.0)])
def test_matches_slow_reference(arch, ignore_threshold):
    anchors, masks, strides, outputs, targets = reference_case(arch, 3, 4, 64, 96, seed=7)
    loss = YOLOLoss(anchors, masks, strides, 3, ignore_threshold=ignore_threshold)
    total, terms = loss(outputs, targets)
    expected = reference_loss(outputs, targets, anchors, masks, strides, 3, ignore_threshold)
    for name, value in expected.items():
        torch.testing.assert_close(terms[name], value.detach(), msg=name)
    if ignore_threshold < 1:  # the case does exercise the ignore test
        assert terms["obj"] < YOLOLoss(anchors, masks, strides, 3, ignore_threshold=1.0)(outputs, targets)[1]["obj"]
    # gradients too
    grads = torch.autograd.grad(total, outputs)
    expected_grads = torch.autograd.grad(sum(expected.values()), outputs)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad)


def test_ignore_test_finds_every_overlap():
    """The windowed ignore test against the dense one (all predictions x all ground truths of the image)."""
    anchors, masks, strides, outputs, targets = reference_case("yolov3", 4, 30, 128, 160, seed=8)
    grid_sizes = [tuple(o.shape[2:4]) for o in outputs]
    # the loss's layout: (4 or 5+C, A, B, cells), cells of all heads one after the other
    raw = torch.cat([o.detach().flatten(2, 3).transpose(0, 1) for o in outputs], 2).permute(3, 0, 1, 2)
    heads = zip(outputs, masks, strides, strict=True)
    decoded = torch.cat([decode(o.detach(), anchors[list(m)], s).unflatten(1, (3, -1)).transpose(0, 1)
                         for o, m, s in heads], 2)  # (A, B, cells, 5+C)
    for threshold in (0.9, 0.7, 0.5, 0.3, 0.05):
        loss = YOLOLoss(anchors, masks, strides, 3, ignore_threshold=threshold)
        found = loss.ignored(raw[:4].reshape(4, 3, -1), targets, grid_sizes).view(3, 4, -1)
        for image in range(4):
            iou = torchvision.ops.box_iou(torchvision.ops.box_convert(decoded[:, image, :, :4].reshape(-1, 4),
                                                                      "cxcywh", "xyxy"),
                                          torchvision.ops.box_convert(targets[targets[:, 0] == image, 2:6],
                                                                      "cxcywh", "xyxy"))
            expected = (iou.max(1).values > threshold).view(3, -1)
            assert torch.equal(found[:, image], expected), (threshold, image)
        assert found.any()


def test_many_boxes_match_reference_and_are_deterministic():
    g = torch.Generator().manual_seed(9)
    anchors, masks, strides = layout("yolov3")
    outputs = raw_maps("yolov3", 8, 416, 416, 3, g, scale=0.5)
    targets = random_targets(g, 8, 63, 416, 416)[:500]
    loss = YOLOLoss(anchors, masks, strides, 3)
    first = loss(outputs, targets)[1]
    again = loss(outputs, targets)[1]
    assert all(torch.equal(first[name], again[name]) for name in first)
    with torch.no_grad():
        expected = reference_loss([o.detach() for o in outputs], targets, anchors, masks, strides, 3, 0.7)
    for name, value in expected.items():
        torch.testing.assert_close(first[name], value, msg=name)


def test_real_model_backward():
    torch.manual_seed(10)
    model = build_model("yolov3-tiny", num_classes=3).train()
    images = torch.rand(2, 3, 64, 96)
    targets = random_targets(torch.Generator().manual_seed(11), 2, 4, 64, 96)
    loss = build_loss(model, LossConfig())
    total, terms = loss(model(images), targets)
    assert torch.isfinite(total) and all(torch.isfinite(v) for v in terms.values())
    total.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_model_layout_and_contiguous_maps_give_the_same_loss():
    """The model returns permuted views of its (B, A, 5+C, H, W) conv outputs; the loss reads any strides alike."""
    anchors, masks, strides, outputs, targets = reference_case("yolov3", 3, 6, 64, 96, seed=12)
    planar = [o.detach().permute(0, 1, 4, 2, 3).contiguous().permute(0, 1, 3, 4, 2).requires_grad_()
              for o in outputs]  # same values, the model's strides
    assert not planar[0].is_contiguous() and torch.equal(planar[0], outputs[0])
    loss = YOLOLoss(anchors, masks, strides, 3)
    total, terms = loss(outputs, targets)
    total_planar, terms_planar = loss(planar, targets)
    assert all(torch.equal(terms[name], terms_planar[name]) for name in terms)
    for grad, grad_planar in zip(torch.autograd.grad(total, outputs), torch.autograd.grad(total_planar, planar),
                                 strict=True):
        torch.testing.assert_close(grad, grad_planar, rtol=0, atol=0)


def test_model_raw_maps_are_views_of_the_conv_outputs():
    model = build_model("yolov3-tiny", num_classes=3).train()
    raw = model(torch.rand(1, 3, 64, 64))
    assert [tuple(r.shape) for r in raw] == [(1, 3, 2, 2, 8), (1, 3, 4, 4, 8)]
    assert all(r.stride(-1) == r.shape[2] * r.shape[3] for r in raw)  # channel planes: no copy was made
