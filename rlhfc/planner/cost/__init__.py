"""Cost model: estimated time and memory of each call option and of reallocations."""
