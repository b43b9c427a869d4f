"""Tiny tile encoders built in code (the hub is out of reach in tests)."""

from __future__ import annotations

from vlm.encoders.tile import TileEncoder, create_tile_encoder


def tiny_gigapath() -> TileEncoder:
    # init_values=1: with the published 1e-5 layer scale a random ViT gives every tile (nearly) the same CLS
    return create_tile_encoder("gigapath", pretrained=False, embed_dim=48, depth=1, num_heads=2, init_values=1.0)
