"""``finetune``: local fine-tuning of the final global adapter, the standard personalization baseline.

After the last round each client continues training the global adapter on its own data for ``local_steps`` steps
(FedAvg followed by local adaptation; e.g. Wang et al. 2019, "Federated Evaluation of On-device Personalization";
Yu et al. 2020, "Salvaging Federated Learning by Local Adaptation"). Nothing changes during the rounds.
"""

from __future__ import annotations

from fedlm.core.update import TensorDict
from fedlm.personalization.base import PERSONALIZATION, PersonalMethod


@PERSONALIZATION.register("finetune")
class Finetune(PersonalMethod):
    """Fine-tune the final global adapter on each client's own data."""

    name = "finetune"

    def personal_state(self, client: str, global_state: TensorDict) -> TensorDict:
        rounds = self.side.config.federation.rounds
        plan = self.side.plan(client, rounds, "finetune", self.params.local_steps, self.params.lr)
        return self.side.train(client, global_state, plan)

    def describe(self) -> dict[str, object]:
        return {"local_steps": self.params.local_steps or self.side.config.federation.local_steps}
