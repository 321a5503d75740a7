"""The ``geomon`` command and what it runs, apart from the library: :mod:`~geomon.tools.cli` (the command),
:mod:`~geomon.tools.demo` (``geomon demo``), :mod:`~geomon.tools.report` (``geomon report``: HTML + PNG from a logged
run) and :mod:`~geomon.tools.inspect_model` (``geomon inspect``: the monitor's plan for a model, and its cost).

Nothing in the library imports this package; ``import geomon`` does not load it.
"""
