"""vlm: align whole-slide images and pathology reports."""
__version__ = "0.1.0"
