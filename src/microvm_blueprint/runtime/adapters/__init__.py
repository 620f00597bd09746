"""VMM drivers. Each module is self-contained; drivers never import each other."""
