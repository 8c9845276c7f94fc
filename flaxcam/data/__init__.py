"""Data sources. Today: the digits-on-a-canvas localization set (:func:`make_digit_canvases`)."""

from flaxcam.data.digits import CLASS_NAMES, DigitCanvases, make_digit_canvases

__all__ = ["CLASS_NAMES", "DigitCanvases", "make_digit_canvases"]
