"""Datasets: COCO-format detection data, augmentation and synthetic data."""
