"""Edge glue: the Envoy config rendered for a stack's ports, and the processes `make run` and the tests start."""
