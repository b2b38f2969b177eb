"""Data preparation: raw text -> formatted articles -> sentence shards -> NVIDIA-format HDF5 shards."""
