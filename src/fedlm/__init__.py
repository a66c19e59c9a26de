"""fedlm: federated training, alignment and use of large language models."""

__version__ = "0.1.0"
