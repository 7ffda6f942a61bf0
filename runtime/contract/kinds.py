"""The words both sides use for what a call does, what a model computes and what it is."""

from __future__ import annotations

from enum import Enum


class CallKind(str, Enum):
    """The three things an RLHF dataflow does with a model."""

    GENERATE = "generate"
    INFERENCE = "inference"
    TRAIN = "train"


class Head(str, Enum):
    """What sits on top of the decoder: next-token logits or one scalar per token."""

    LM = "lm"
    VALUE = "value"


class ModelKind(str, Enum):
    """A neural decoder with parameters, or a reward without any: a registered rule or
    user Python functions (`python(...)` in the source; imported by the workers only)."""

    LLAMA = "llama"
    RULE = "rule"
