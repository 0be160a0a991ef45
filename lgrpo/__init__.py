"""lgrpo: listener-augmented GRPO for vision-language image-preference judges."""

__version__ = "0.1.0"
