"""Planners: the CP-SAT model and the baselines it is compared with."""
