"""torch.compile traces features / pyramid / embed of every family without graph breaks."""

import math

import pytest
import torch

import backbone_sdk as bs
from conftest import tiny_names


@pytest.mark.slow
@pytest.mark.parametrize("name", tiny_names())
def test_fullgraph_compile(name):
    torch._dynamo.reset()
    model = bs.create_backbone(name).eval()
    size = max(math.lcm(model.spec.input.size_divisibility, 32), 64)
    x = torch.randn(1, 3, size, size)
    for method in ("features", "pyramid", "embed"):
        fn = getattr(model, method)
        compiled = torch.compile(fn, fullgraph=True, backend="eager")  # fullgraph: any graph break raises
        with torch.no_grad():
            expected, got = fn(x), compiled(x)
        if isinstance(expected, dict):
            assert expected.keys() == got.keys()
            for k in expected:
                torch.testing.assert_close(got[k], expected[k])
        else:
            torch.testing.assert_close(got, expected)
