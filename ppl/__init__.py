"""ppl: programmable variational inference over NumPyro."""
