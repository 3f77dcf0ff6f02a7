"""One server's parts, made from its ``ServerConfig``: the catalog of files, the engine, the job queue.

The web layer (``a1111.py``, ``native.py``) holds a ``Server`` and calls it; nothing is global.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ldm.server.catalog import Catalog, ModelEntry
from ldm.server.config import ServerConfig
from ldm.server.engine import Engine
from ldm.server.jobs import JobQueue
from ldm.server.translate import ServerDefaults


@dataclass
class Server:
    config: ServerConfig
    catalog: Catalog
    engine: Engine
    queue: JobQueue

    @classmethod
    def load(cls, config: ServerConfig) -> Server:
        """Load the startup model (``config.model`` or the default one); the worker starts with ``start``."""
        from ldm.loading import DEFAULT_MODEL_DIR

        path = Path(config.model or DEFAULT_MODEL_DIR)
        catalog = Catalog(ModelEntry(path.name, path), config.models_dir, config.loras_dir)
        engine = Engine(
            catalog.startup_model, config.limits.max_pixels, config.outputs, config.device, config.dtype, config.loras_dir, config.embeddings_dir
        )
        return cls(config, catalog, engine, JobQueue(engine, config.queue_size, config.history))

    def start(self) -> None:
        self.queue.start()

    def close(self) -> None:
        self.queue.close()

    def defaults(self) -> ServerDefaults:
        """What the options set for the next request."""
        return ServerDefaults(
            clip_skip=self.engine.clip_skip, find_model=self.catalog.find_model, loras_dir=self.config.loras_dir,
            controlnet_dir=self.config.controlnet_dir,
        )
