import math

from benchmarks.param_sets import resnet50


def test_resnet50_matches_torchvision_counts():
    shapes = resnet50()
    assert len(shapes) == 161
    assert sum(math.prod(s) for _, s in shapes) == 25_557_032
    assert sum("weight" in n for n, _ in shapes) == 107
    assert len({n for n, _ in shapes}) == 161
