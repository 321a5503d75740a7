"""A rule for tests of what an alert does: it fires (WARN, one event per evaluation, no episodes) at every
evaluation from a given step on."""

from geomon.alerts import AlertEvent


class FiresFrom:
    def __init__(self, step: int = 0, name: str = "fires") -> None:
        self.step, self.name = step, name

    def evaluate(self, step, scalars, heads=None):
        if step < self.step:
            return []
        return [AlertEvent(rule=self.name, key="k", step=step, kind="fired", level="WARN", title="t", text="x")]
