"""The README is what a newcomer reads first: each section once, every registered optimizer
named, and the two commands the brief promises."""

import re
from pathlib import Path

from soaplab.registry import OPTIMIZERS

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_each_section_appears_once():
    headings = re.findall(r"^#+ .*$", README, flags=re.M)
    assert len(headings) == len(set(headings)), headings
    assert len(README) < 30_000


def test_every_registered_optimizer_is_named():
    missing = [name for name in OPTIMIZERS if f"`{name}`" not in README]
    assert not missing, missing


def test_the_two_commands_are_given():
    assert "make main" in README and "make test" in README
