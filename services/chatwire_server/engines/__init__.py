"""Inference engines: each turns a `ChatRequest` into an async stream of `EngineEvent`s."""
