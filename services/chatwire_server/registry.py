"""The model registry: model id -> engine, from a TOML config file."""

from __future__ import annotations

import logging
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from chatwire_server import metrics
from chatwire_server.engines.base import Engine, RelayEngine
from chatwire_server.engines.kinds import ENGINE_FACTORIES, RELAY_FACTORIES
from chatwire_server.engines.worker import WorkerEngine
from chatwire_server.errors import ModelNotFoundError

log = logging.getLogger(__name__)
# What a model may read, by OpenAI's content part types: `text` (and `refusal`), `image_url`, `input_audio`,
# `file`. A relayed model reads what its entry's `input` lists, by default everything (its server decides);
# chatwire's own engines read text, and their entries may say no more.
INPUT_KINDS = {"text": "text", "image": "image_url", "audio": "input_audio", "file": "file"}


@dataclass(frozen=True)
class ModelEntry:
    """One served model."""

    id: str
    owned_by: str
    created: int
    engine: Engine | RelayEngine
    # The content part kinds (INPUT_KINDS) a request to it may hold.
    inputs: frozenset[str] = frozenset(INPUT_KINDS)


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
            inputs = model.get("input", list(INPUT_KINDS) if kind in RELAY_FACTORIES else ["text"])
            if kind not in RELAY_FACTORIES and inputs != ["text"]:
                raise ValueError(f"{path}: model {model['id']!r}: engine {kind!r} reads text only (`input`)")
            kinds_ok = isinstance(inputs, list) and all(isinstance(k, str) and k in INPUT_KINDS for k in inputs)
            if not kinds_ok or "text" not in inputs:
                raise ValueError(
                    f"{path}: model {model['id']!r}: `input` must list `text` and any of {', '.join(INPUT_KINDS)}"
                )
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
                    inputs=frozenset(inputs),
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
