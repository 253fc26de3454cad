"""dcmflow tasks (see DESIGN.md)."""
