"""The engine kinds a config file may name (`engine = "..."`), each imported only when a model uses it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from chatwire_server.engines.base import Engine, RelayEngine


def _llama_cpp_engine(settings: dict[str, Any]) -> Engine:
    # Imported here so that a config without this engine does not load llama.cpp.
    from chatwire_server.engines.llama_cpp import LlamaCppEngine

    return LlamaCppEngine.from_settings(settings)


def _scripted_engine(settings: dict[str, Any]) -> Engine:
    from chatwire_server.engines.scripted import ScriptedEngine

    return ScriptedEngine.from_settings(settings)


# Engines that compute: each runs in a worker process (`engines.worker`) unless its entry says `in_process`.
ENGINE_FACTORIES: dict[str, Callable[[dict[str, Any]], Engine]] = {
    "llama_cpp": _llama_cpp_engine,
    "scripted": _scripted_engine,
}


def _openai_engine(model_id: str, settings: dict[str, Any]) -> RelayEngine:
    from chatwire_server.engines.openai_upstream import OpenAIUpstreamEngine

    return OpenAIUpstreamEngine.from_settings(model_id, settings)


# Engine kinds that forward to other servers: they wait on the network, not the CPU, so they run in the
# server's own event loop rather than a worker process.
RELAY_FACTORIES: dict[str, Callable[[str, dict[str, Any]], RelayEngine]] = {"openai": _openai_engine}
