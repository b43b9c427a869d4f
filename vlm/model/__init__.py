"""The aligned slide–text model: projection heads, `SlideTextModel`, losses."""

from vlm.model.clip import SlideTextConfig, SlideTextModel, build_tiny_model, create_model

__all__ = ["SlideTextConfig", "SlideTextModel", "build_tiny_model", "create_model"]
