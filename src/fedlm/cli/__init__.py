"""fedlm's command line (``fedlm run | compare | audit | export | flower ... | privacy ...``)."""

from fedlm.cli.main import app, main

__all__ = ["app", "main"]
