"""vmimagemanager: re-image libvirt virtual machines fast and repeatably."""

__version__ = "1.0.0"
