"""Every press with the options its tests use (kvpress's ``tests/default_presses.py``): the press tests loop over
this one list, so a new press is tested by adding a line here."""
from rap.presses import PRESSES

default_presses = [(PRESSES["streaming"], {"sinks": 2}), (PRESSES["knorm"], {}),
                   (PRESSES["snapkv"], {"window": 4, "kernel": 3}), (PRESSES["kvzip"], {})]
assert {cls.name for cls, _ in default_presses} == set(PRESSES), "a registered press is missing from default_presses"
