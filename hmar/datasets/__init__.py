"""Dataset builders: packages that the registries carry -> ``OUT/<split>/<NN_class>/*.png`` folders.

Every builder also writes ``OUT/classes.json`` (ordered class names) and ``OUT/LICENSE.txt``.
See :mod:`hmar.datasets.folder` for the layout and its reader.
"""
from .emoji import build_emoji
from .fashion_mnist import build_fashion_mnist
from .folder import ImageFolder, load_image, load_image_folder, read_class_names

__all__ = ["build_emoji", "build_fashion_mnist", "ImageFolder", "load_image", "load_image_folder",
           "read_class_names"]
