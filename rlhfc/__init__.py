"""rlhfc: a compiler for RLHF training dataflows.

parse → check → IR → estimate → solve → lower → emit → run; one stage per module.
"""

__version__ = "0.1.0"
