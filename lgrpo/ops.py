"""Python face of the native ops (lgrpo._C). Until the extension lands: the reference."""

from lgrpo.kernels.reference import listener_confidence

__all__ = ["listener_confidence"]
