"""Reading user data: folders of unlabeled images."""

from diffscrub.data.images import (
    IMAGE_EXTENSIONS,
    ImageSet,
    load_image_folder,
    scan_image_folder,
)

__all__ = ["IMAGE_EXTENSIONS", "ImageSet", "load_image_folder", "scan_image_folder"]
