"""A SuperNode's state directory: where its client's personal state lives (``personalization.method`` over Flower).

``fedlm flower supernode --state-dir DIR`` (default ``./fedlm-node-state`` in the directory the node starts in) passes
it to the node's ClientApp as the node-config key :data:`STATE_DIR_KEY`; a node started with Flower's own
``flower-supernode`` sets that key itself. Light on imports: the CLI checks it before the node starts.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedlm.core.errors import FedlmError

STATE_DIR_KEY = "fedlm-state-dir"  # node-config key: the node's state directory
DEFAULT_STATE_DIR = Path("fedlm-node-state")  # relative to the node's working directory


def check_state_dir(path: Path, what: str = "--state-dir") -> Path:
    """``path`` created if needed and writable (a file written and removed there), else a one-line refusal."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".fedlm-write-test-"):
            pass
    except OSError as exc:
        raise FedlmError(
            f"{what} {str(path)!r} is not a writable directory ({exc.strerror or exc}); a node keeps its client's personal state there: "
            "give a writable --state-dir"
        ) from None
    return path


def node_state_root(method: str, node_config: Mapping[str, Any]) -> Path:
    """The node's state directory (node-config key :data:`STATE_DIR_KEY`) for personalization ``method``, checked
    writable; a node without one is refused."""
    raw = node_config.get(STATE_DIR_KEY)
    if not raw:
        raise FedlmError(
            f"`personalization.method: {method}` keeps each client's personal state on its node, and this SuperNode has no state "
            f"directory: start it with `fedlm flower supernode ... --state-dir DIR` (or Flower's --node-config '{STATE_DIR_KEY}=\"DIR\"')"
        )
    return check_state_dir(Path(os.path.expanduser(str(raw))), f"the node's state directory ({STATE_DIR_KEY})")
