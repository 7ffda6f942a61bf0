"""rlhfc's runtime: what generated programs import (installed as `rlhfc_runtime`).

Modules that only compute (layout, transfer plans) import no torch, so the compiler
may use them; modules that touch devices import torch lazily.
"""
