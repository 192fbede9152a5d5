"""The API layer: the gRPC servicer, its boundary (auth, limits, logs, metrics, errors) and proto <-> domain."""
