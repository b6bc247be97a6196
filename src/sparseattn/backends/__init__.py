"""Backends: how attention runs under a plan. ``reference`` is the specification."""

from __future__ import annotations

from .base import AttentionCall, Backend
from .reference import ReferenceBackend

_BACKENDS: dict[str, type[Backend]] = {"reference": ReferenceBackend}


def register_backend(name: str, cls: type[Backend]) -> None:
    _BACKENDS[name] = cls


def get_backend(backend: str | Backend) -> Backend:
    if isinstance(backend, Backend):
        return backend
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: {', '.join(sorted(_BACKENDS))}")
    return _BACKENDS[backend]()


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


from .block import BlockSparseBackend  # noqa: E402  (registers "block")


__all__ = ["AttentionCall", "Backend", "ReferenceBackend", "BlockSparseBackend", "get_backend", "register_backend", "available_backends"]
