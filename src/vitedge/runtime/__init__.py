"""How an optimised encoder is run, rather than what it computes: ``-O compile`` (:mod:`.compile`)."""
