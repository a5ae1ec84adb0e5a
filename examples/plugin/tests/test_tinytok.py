import pytest

import backbone_sdk as bs
import backbone_sdk.testing as bst
import tinytok


@pytest.fixture(autouse=True)
def plugin(register_plugin):
    register_plugin(tinytok, name="tinytok")


def test_contract(tmp_path):
    bst.check_backbone("tinytok_s", tmp_path=tmp_path, compile=True)


@pytest.mark.parametrize("overrides", [{"depth": 3}, {"dim": 48, "heads": 3}, {"registers": 0}, {"parts": ()}])
def test_overrides(overrides):
    bst.check_overrides("tinytok_s", **overrides)


def test_typo_is_caught():
    with pytest.raises(bs.InvalidOptionError, match="Did you mean 'depth'"):
        bs.create_backbone("tinytok_s", deppth=4)
