pytest_plugins = ["backbone_sdk.testing"]
