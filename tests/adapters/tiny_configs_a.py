"""Tiny configs for one batch of architectures (see tiny_configs.py)."""

from __future__ import annotations

from typing import Any

import transformers

from tests.adapters.tiny_configs import COMMON, tiny
