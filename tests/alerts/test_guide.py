"""What docs/guides/alerts.md states about the rules' options, and its snippet that builds a rule set, hold."""

import inspect
import re
from pathlib import Path

import pytest

from geomon.alerts import AlertEngine, Custom, Drop, EntropyCollapse, MaxLogitAbove, NonFinite, RankCollapse, Threshold

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "guides" / "alerts.md"
RULES = [EntropyCollapse, MaxLogitAbove, RankCollapse, NonFinite, Threshold, Drop, Custom]


def _block_after(heading: str) -> str:
    text = GUIDE.read_text(encoding="utf-8")
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_guides_rule_of_your_own_snippet_runs():
    namespace: dict = {}
    exec(compile(_block_after("## A rule of your own"), str(GUIDE), "exec"), namespace)
    engine = AlertEngine(namespace["rules"])
    assert [rule.name for rule in engine.rules][-2:] == ["sigma_high", "rank_vs_alpha"]


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.__name__)
def test_every_rule_has_name_and_cooldown_and_all_but_entropy_collapse_a_level(rule):
    """The guide: every rule has a name and a cooldown option; every rule but EntropyCollapse a level."""
    options = inspect.signature(rule).parameters
    assert {"name", "cooldown"} <= set(options)
    assert ("level" in options) == (rule is not EntropyCollapse)
    text = " ".join(GUIDE.read_text(encoding="utf-8").split())
    assert "Every rule but `EntropyCollapse` has a `level` option" in text
