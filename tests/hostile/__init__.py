"""The hostile-input corpus: generated broken, lying and malicious files × every command.

``cases.py`` generates the inputs (nothing is stored), ``commands.py`` is the command matrix (one
row per command), ``harness.py`` runs one (case × command) pair and checks what must always hold,
``test_hostile.py`` parametrizes pytest over the pairs, and ``report.py`` prints the outcome table:

    python -m tests.hostile.report
"""
