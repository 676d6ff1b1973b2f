"""The floating-point precisions by the names settings, profiles and the CLI use (one table for all layers)."""

from __future__ import annotations

import torch

FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
