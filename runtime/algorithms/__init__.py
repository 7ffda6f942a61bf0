"""RLHF algorithms as registered interfaces: losses, advantages, rewards."""
