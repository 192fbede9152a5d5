"""The model registry: model id -> engine, from a TOML config file."""

from __future__ import annotations

import logging
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chatwire_server import metrics
from chatwire_server.engines.base import Engine, RelayEngine
from chatwire_server.engines.worker import WorkerEngine
from chatwire_server.errors import ModelNotFoundError

log = logging.getLogger(__name__)


def _llama_cpp_engine(settings: dict[str, Any]) -> Engine:
    # Imported here so that a config without this engine does not load llama.cpp.
    from chatwire_server.engines.llama_cpp import LlamaCppEngine

    return LlamaCppEngine.from_settings(settings)


def _scripted_engine(settings: dict[str, Any]) -> Engine:
    from chatwire_server.engines.scripted import ScriptedEngine

    return ScriptedEngine.from_settings(settings)


# Engine kinds a config file may name.
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


@dataclass(frozen=True)
class ModelEntry:
    """One served model."""

    id: str
    owned_by: str
    created: int
    engine: Engine | RelayEngine


class ModelRegistry:
    """The models this server serves, each with its loaded engine."""

    def __init__(self, entries: list[ModelEntry]) -> None:
        self._entries = {entry.id: entry for entry in entries}

    @classmethod
    def from_config(cls, path: Path) -> ModelRegistry:
        """Load every model listed in `path` (see config/models.toml for the format). Each engine runs in a
        worker process of its own (see `engines.worker`) unless the entry says `in_process = true`; engines that
        forward to other servers (`RELAY_FACTORIES`) always run in the server."""
        config = tomllib.loads(path.read_text())
        entries = []
        for model in config.get("models", []):
            kind = model["engine"]
            if kind not in ENGINE_FACTORIES and kind not in RELAY_FACTORIES:
                raise ValueError(f"{path}: model {model['id']!r} names unknown engine {kind!r}")
            started = time.monotonic()
            settings = model.get("settings", {})
            engine: Engine | RelayEngine
            if kind in RELAY_FACTORIES:
                engine = RELAY_FACTORIES[kind](model["id"], settings)
            elif model.get("in_process", False):
                engine = ENGINE_FACTORIES[kind](settings)
            else:
                engine = WorkerEngine(model["id"], kind, settings, metrics.ENGINE_RESTARTS.labels(model["id"]).inc)
            log.info(
                "model ready",
                extra={"model": model["id"], "engine": kind, "load_s": round(time.monotonic() - started, 2)},
            )
            entries.append(
                ModelEntry(
                    id=model["id"],
                    owned_by=model.get("owned_by", "chatwire"),
                    created=int(model.get("created", time.time())),
                    engine=engine,
                )
            )
        if not entries:
            raise ValueError(f"{path}: no [[models]] configured")
        return cls(entries)

    def get(self, model_id: str) -> ModelEntry:
        """The entry for `model_id`, or `ModelNotFoundError`."""
        try:
            return self._entries[model_id]
        except KeyError:
            raise ModelNotFoundError(model_id) from None

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._entries

    def all(self) -> list[ModelEntry]:
        """Every entry, in config order."""
        return list(self._entries.values())

    async def close(self) -> None:
        """Close every engine."""
        for entry in self._entries.values():
            await entry.engine.close()
