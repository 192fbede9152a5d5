"""chatwire: an OpenAI-compatible chat completion service over gRPC."""
