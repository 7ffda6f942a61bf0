"""Planner: IR + cluster + hardware → Plan (cost model, CP-SAT search, explain, report)."""
