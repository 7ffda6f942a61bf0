"""Back end: Plan → op program (lower) → Python file (emit)."""
