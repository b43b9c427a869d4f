"""The aligned slide–text model: projection heads, `SlideTextModel`, losses."""

from vlm.model.clip import SlideTextConfig, SlideTextModel, create_model

__all__ = ["SlideTextConfig", "SlideTextModel", "create_model"]
