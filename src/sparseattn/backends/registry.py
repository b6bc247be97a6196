"""Backends by name: ``sparsify(model, plan, backend="block")`` looks them up here."""

from __future__ import annotations

from .base import Backend
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
