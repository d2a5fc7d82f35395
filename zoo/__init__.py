"""The tfnorm zoo: experiments that show what normalization does.

Run `tfnorm-zoo` (or `python -m zoo`) for the default comparison, and
`tfnorm-zoo --help` for the rest. The zoo depends on tfnorm; tfnorm never
depends on the zoo.
"""
