"""Backends: how attention runs under a plan. ``reference`` is the specification."""

from __future__ import annotations

from .base import AttentionCall, Backend
from .block import BlockSparseBackend  # registers "block"
from .reference import ReferenceBackend
from .registry import available_backends, get_backend, register_backend

__all__ = ["AttentionCall", "Backend", "ReferenceBackend", "BlockSparseBackend", "get_backend", "register_backend",
           "available_backends"]
