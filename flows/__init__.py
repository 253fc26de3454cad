"""dcmflow flows (see DESIGN.md)."""
