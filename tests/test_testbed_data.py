import pytest
import torch
import torch.nn.functional as F

from ddit.testbed.data import IMAGE_SIZE, PROMPTS, class_id, make_dataset, make_images


def test_same_seed_same_images_other_seed_other_images():
    a, la = make_dataset(64, seed=3)
    b, lb = make_dataset(64, seed=3)
    c, _ = make_dataset(64, seed=4)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)


def test_shape_range_and_balance():
    images, labels = make_dataset(400, seed=0)
    assert images.shape == (400, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert images.min() >= -1 and images.max() <= 1
    assert torch.bincount(labels).tolist() == [100] * len(PROMPTS)


@pytest.mark.parametrize("k", [2, 4])
def test_classes_are_graded_by_fine_detail(k):
    """What a k-times coarser grid loses (image minus its smooth k x k reconstruction)
    rises along PROMPTS: glow < moon < shapes < stripes."""
    lost = []
    for c in range(len(PROMPTS)):
        x = make_images(torch.full((500,), c), seed=0)
        coarse = F.interpolate(F.avg_pool2d(x, k), scale_factor=k, mode="bilinear")
        lost.append((x - coarse).abs().mean().item())
    assert lost == sorted(lost), dict(zip(PROMPTS, lost))
    assert lost[-1] > 10 * lost[0]


def test_unknown_prompt_lists_known_ones():
    assert class_id("stripes") == PROMPTS.index("stripes")
    with pytest.raises(ValueError, match="glow, moon, shapes, stripes"):
        class_id("zebra")
