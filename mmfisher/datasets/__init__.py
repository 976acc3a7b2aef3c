"""Generated datasets for tests, tools and the demo."""
from .shapes import make_coco_shapes, make_imagenet_shapes

__all__ = ["make_coco_shapes", "make_imagenet_shapes"]
