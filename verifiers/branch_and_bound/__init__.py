"""Complete verification by branch and bound on ReLU splits: `domains.py` holds the
subdomains and their beta-CROWN bounds, `branching.py` the BaBSR heuristic, `search.py`
the loop, `input_split.py` splitting of the input box for networks with few inputs,
`verifier.py` the registered ``bab`` verifier."""

from certbench.verifiers.branch_and_bound import verifier  # noqa: F401  (registers "bab")
