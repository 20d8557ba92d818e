"""Box conversions by hand and as a round trip."""
import torch

from utils.boxes import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh


def test_by_hand():
    assert box_cxcywh_to_xyxy(torch.tensor([[50.0, 40.0, 20.0, 10.0]])).tolist() == [[40.0, 35.0, 60.0, 45.0]]
    assert box_xyxy_to_cxcywh(torch.tensor([[40.0, 35.0, 60.0, 45.0]])).tolist() == [[50.0, 40.0, 20.0, 10.0]]


def test_round_trip_any_leading_shape():
    boxes = torch.rand(2, 5, 4) * 100
    assert torch.allclose(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(boxes)), boxes, atol=1e-4)
    assert box_cxcywh_to_xyxy(torch.zeros(0, 4)).shape == (0, 4)
