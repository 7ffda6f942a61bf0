"""Front end: source text → checked IR (parse, check, fmt, graph, highlight)."""
