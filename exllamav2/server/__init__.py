"""OpenAI-compatible HTTP server over the dynamic generator (FastAPI + uvicorn, the `server` extra)."""

from .engine import ServerEngine, load_engine
from .app import create_app
from .runner import run_server, start_in_thread

__all__ = ["ServerEngine", "load_engine", "create_app", "run_server", "start_in_thread"]
