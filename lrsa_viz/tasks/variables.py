"""Variable tracking (RULER-style, written here): follow chains of assignments to find every name of one value.

``n_chains`` chains of ``hops + 1`` variables: "VAR QKZ = 48213." then "VAR RTP = VAR QKZ." and so on, the chains
interleaved through the document (each chain in order). Asked: "Which variables are assigned the value 48213?";
the answer is the set of names of that chain ("QKZ, RTP, LMN, BXW"), scored by set F1. Names are three capital
letters that are exactly two tokens after a space (one question length, short answers).
"""
from __future__ import annotations

import random
import string

from ..checks import check_int
from .base import Spec, Task, distinct_values


class VariableTracking(Task):
    name = "variable_tracking"
    metric = "set_f1"
    instruction = "Answer with the variable names only, separated by commas."
    description = "chains of assignments VAR B = VAR A: all names of one value (set F1)"

    def __init__(self, *args, n_chains: int = 3, hops: int = 3, value_digits: int = 5, **kwargs):
        super().__init__(*args, **kwargs)
        for name, value, lo, hi in (("n_chains", n_chains, 1, 8), ("hops", hops, 1, 8),
                                    ("value_digits", value_digits, 2, 9)):
            check_int(name, value, lo, hi)
        self.n_chains, self.hops, self.value_digits = n_chains, hops, value_digits
        pick = random.Random("lrsa-viz-variable-names")
        candidates = sorted({"".join(pick.choice(string.ascii_uppercase) for _ in range(3)) for _ in range(3000)})
        self.var_names = [c for c, n in zip(candidates, self.haystack.count([" " + c for c in candidates])) if n == 2]
        if len(self.var_names) < 4 * n_chains * (hops + 1):
            raise ValueError("tokenizer: too few two-token variable names")

    def make(self, rng):
        names = rng.sample(self.var_names, self.n_chains * (self.hops + 1))
        values = distinct_values(rng, self.n_chains, self.value_digits)
        chains = [names[c * (self.hops + 1):(c + 1) * (self.hops + 1)] for c in range(self.n_chains)]
        statements = []  # (chain, text), each chain in order, chains interleaved at random
        cursor = [0] * self.n_chains
        while any(c <= self.hops for c in cursor):
            c = rng.choice([i for i in range(self.n_chains) if cursor[i] <= self.hops])
            j = cursor[c]
            rhs = values[c] if j == 0 else f"VAR {chains[c][j - 1]}"
            statements.append((c, f"VAR {chains[c][j]} = {rhs}."))
            cursor[c] += 1
        asked_chain = rng.randrange(self.n_chains)
        return Spec(needles=[t for _, t in statements],
                    question=f"Which variables are assigned the value {values[asked_chain]}?",
                    answer=", ".join(chains[asked_chain]),
                    asked=[i for i, (c, _) in enumerate(statements) if c == asked_chain],
                    retrieve=list(chains[asked_chain]), ordered=True, forbidden=tuple(names),
                    meta={"value": values[asked_chain]})
