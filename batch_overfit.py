"""Overfit one batch: the quickest proof that model, loss, decoding and evaluation agree.

    python batch_overfit.py --set data.root=data/shapes model.num_classes=6 model.arch=yolov3-tiny data.img_size=128

Takes the first --images training images that have boxes (letterboxed, no augmentation), trains on that one batch
for --steps steps (Adam at train.lr, no schedule), and reports the loss and the COCO AP50 of the model on the same
batch. A healthy setup drives the loss down and AP50 towards 1.
"""
from __future__ import annotations

import argparse

import torch

from datasets.coco import CocoDetection, DatasetError, collate
from datasets.coco_eval import coco_evaluate, to_coco_rows
from datasets.transforms import Preprocess
from models import build_model
from models.loss import build_loss
from models.postprocess import postprocess, to_original_pixels
from utils.cli import add_config_args, parse_cli


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train on one batch, print progress, return the final losses and AP50."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(parser)
    parser.add_argument("--steps", type=int, default=200, help="optimisation steps (default 200)")
    parser.add_argument("--images", type=int, default=8, help="images in the batch (default 8)")
    args, cfg, device = parse_cli(parser, argv)
    if args.steps < 1 or args.images < 1:
        parser.error(f"--steps and --images must be at least 1, got {args.steps} and {args.images}")
    images_dir, annotations = cfg.data.split_paths("train")
    try:
        dataset = CocoDetection(images_dir, annotations, Preprocess(), cfg.data.img_size, cfg.data.skip_bad_images)
    except (DatasetError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from e
    if len(dataset.class_names) != cfg.model.num_classes:
        raise SystemExit(f"error: {annotations} has {len(dataset.class_names)} categories but model.num_classes is "
                         f"{cfg.model.num_classes}")
    chosen = [i for i, image_id in enumerate(dataset.ids) if len(dataset.object_boxes(image_id))][:args.images]
    images, targets, metas = collate([dataset[i] for i in chosen])
    images, targets = images.to(device), targets.to(device)

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model.arch, cfg.model.encoder, cfg.model.num_classes, cfg.model.anchors,
                        cfg.model.pretrained, cfg.model.pretrained_path).to(device).train()
    loss_fn = build_loss(model, cfg.loss)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    print(f"overfitting {len(chosen)} images ({len(targets)} boxes) of {annotations} at {cfg.data.img_size} px, "
          f"{cfg.model.arch}/{cfg.model.encoder}, {args.steps} steps on {device}")
    for step in range(1, args.steps + 1):
        loss, terms = loss_fn(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step == 1 or step % max(1, args.steps // 10) == 0:
            print(f"step {step:>5} loss {loss.item():.4f} " + " ".join(f"{k} {v:.3f}" for k, v in terms.items()))

    with torch.inference_mode():
        # BatchNorm's running statistics trail the fast-changing weights of an overfit run (Darknet's momentum
        # 0.01 averages over ~100 steps); recompute them on the batch so that eval mode sees what training saw.
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)):
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: one pass gives the batch statistics exactly
        model(images)
        model.eval()
        detections = postprocess(model(images), cfg.eval.conf_threshold, cfg.eval.nms_iou, cfg.eval.max_det,
                                 cfg.eval.max_candidates, cfg.eval.multi_label)
    rows = to_coco_rows(to_original_pixels(detections.cpu(), metas), metas, dataset.category_ids)
    image_ids = [m["image_id"] for m in metas]
    stats, _, _, _ = coco_evaluate(dataset.coco, rows, image_ids, dataset.class_names, cfg.eval.backend)
    print(f"after {args.steps} steps: loss {loss.item():.4f}, AP50 on the batch {stats['AP50']:.4f} "
          f"(AP {stats['AP']:.4f})")
    return {"loss": loss.item(), **{k: float(v) for k, v in terms.items()}, "AP50": stats["AP50"], "AP": stats["AP"]}


if __name__ == "__main__":
    main()
