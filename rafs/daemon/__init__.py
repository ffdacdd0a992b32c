"""The ``nydusd`` daemon: FUSE / kernel EROFS mounts of RAFS images with a control API."""
