"""The ``attack`` section: malicious clients in the simulation (the attack's own parameters sit beside ``name``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class AttackConfig(BaseModel):
    """Malicious clients in the simulation: which attack (by name), which clients, the attack's own parameters.

    ``clients`` names the attackers; ``fraction`` draws round(fraction * clients) of them with the config seed.
    The attack's parameters sit beside ``name`` and are checked by it at load.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    name: str | None = Field(None, description="sign_flip | scaling | gaussian_noise | alie | ipm | corrupt_responses | backdoor | safety")
    clients: list[str] | None = None
    fraction: float | None = Field(None, gt=0.0, le=1.0)

    def params(self) -> dict[str, Any]:
        """The attack's parameters: every key but ``name``, ``clients`` and ``fraction``."""
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _who(self) -> AttackConfig:
        if self.name is None:
            if self.clients or self.fraction is not None or self.model_extra:
                raise ValueError("`attack.name` is required when `attack.clients`, `attack.fraction` or parameters are set")
            return self
        if (self.clients is None) == (self.fraction is None):
            raise ValueError("give exactly one of `attack.clients` (names) or `attack.fraction` (share of the clients)")
        if self.clients is not None and not self.clients:
            raise ValueError("`attack.clients` must name at least one client")
        return self
