"""Bit-packed layouts and the .spfq container (bits.py holds the bit order every runtime reads)."""

from .bits import (
    WORD,
    WORD_BITS,
    pack_bits,
    pack_fields,
    pack_planes,
    pack_planes_rows,
    pack_rows,
    unpack_bits,
    unpack_fields,
    unpack_planes,
    unpack_planes_rows,
    unpack_rows,
    words_for,
)
from .container import FORMAT_VERSION, load, read_header, save
from .layouts import (
    LAYOUTS,
    Layout,
    buffer_specs,
    check_sparse,
    default_layout,
    field_bits,
    get_layout,
    layer_info,
    pack_layer,
    padded,
    register,
    storage_layout,
    storage_report,
    table_fields,
    unpack_layer,
)

__all__ = [
    "WORD", "WORD_BITS", "words_for", "pack_bits", "unpack_bits", "pack_planes", "unpack_planes",
    "pack_fields", "unpack_fields", "pack_rows", "unpack_rows", "pack_planes_rows", "unpack_planes_rows",
    "LAYOUTS", "Layout", "register", "get_layout", "default_layout", "storage_layout", "field_bits",
    "layer_info", "pack_layer", "unpack_layer", "padded", "storage_report", "buffer_specs", "table_fields",
    "check_sparse",
    "FORMAT_VERSION", "save", "load", "read_header",
]
