"""``dual``: FedDPA (Yang et al. 2024, "Dual-Personalizing Adapter for Federated Foundation Models").

Each client holds two LoRA adapters on the frozen base model: a global adapter trained federatedly (uploaded and
aggregated as usual) and a local adapter that never leaves it. Here the local adapter is learnt iteratively
(their FedDPA-T): every time the client is sampled, after its global update, it trains the local adapter on its own
data, starting from its last local adapter (the received global adapter before its first round: FedDPA starts the
local adapter from the global one's generic knowledge). At inference the two are combined, per instance with
weights from the instance's similarity to the client's data (their Sec. 4.3, the serving side with the client's
profile); the evaluation after the run uses the fixed weight ``weight`` on the global adapter and 1 - ``weight``
on the local one (both adapters active, each LoRA output scaled).
"""

from __future__ import annotations

from fedlm.core.task import ClientTask
from fedlm.core.update import ClientUpdate
from fedlm.personalization.base import PERSONALIZATION, PersonalMethod


@PERSONALIZATION.register("dual")
class Dual(PersonalMethod):
    """A global adapter trained federatedly and a local adapter per client, combined at inference."""

    name = "dual"
    combine = "dual"

    def after(self, client: str, task: ClientTask, update: ClientUpdate) -> ClientUpdate:
        start = self.side.store.latest(client, before=task.plan.round) or dict(task.state)
        plan = self.side.plan(client, task.plan.round, "dual", self.params.local_steps, self.params.lr, task.plan.rank)
        self.side.store.save(client, task.plan.round, self.side.train(client, start, plan))
        return update

    def describe(self) -> dict[str, object]:
        return {"weight": self.params.weight, "global_adapter": "../../adapter"}
