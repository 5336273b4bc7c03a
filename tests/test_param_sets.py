import math

from benchmarks.param_sets import resnet50


def test_resnet50_matches_torchvision_counts():
    shapes = resnet50()
    assert len(shapes) == 161
    assert sum(math.prod(s) for _, s in shapes) == 25_557_032
    assert sum("weight" in n for n, _ in shapes) == 107
    assert len({n for n, _ in shapes}) == 161


def test_the_benchmark_resnet50_model_has_the_torchvision_parameter_set():
    from benchmarks.models import resnet50 as model

    got = [(n, tuple(p.shape)) for n, p in model().named_parameters()]
    assert got == resnet50()


def test_vit_and_gpt2_parameter_sets_match_the_published_sizes():
    from benchmarks.param_sets import gpt2_medium, vit_b16

    assert (len(vit_b16()), sum(math.prod(s) for _, s in vit_b16())) == (152, 86_567_656)
    assert (len(gpt2_medium()), sum(math.prod(s) for _, s in gpt2_medium())) == (292, 354_823_168)
