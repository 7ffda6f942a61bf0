"""What the compiler and the runtime share: call kinds, heads, model kinds, interfaces
with their hyper-parameters, model shapes with exact per-shard parameter counts, and
layouts. Pure Python (no torch): the compiler reaches the runtime only through here.
"""
