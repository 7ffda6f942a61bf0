"""The `.rlhf` standard library of dataflows, shipped as package data (`rlhfc_stdlib`)."""
