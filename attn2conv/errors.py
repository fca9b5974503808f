"""Exceptions with one-line messages: the CLI prints them as they are and exits 2."""


class Attn2ConvError(Exception):
    """Base class: every user-facing failure is one of these, with a one-line message saying what to do."""


class CaptureError(Attn2ConvError):
    """The model could not be captured as a static-shape graph."""


class PipelineError(Attn2ConvError):
    """A pipeline was built or edited wrongly (unknown pass id, bad position)."""
